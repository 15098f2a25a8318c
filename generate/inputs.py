"""Input corpora: Parquet, JSON Lines, plain text, or a `datasets.save_to_disk` folder.

Every reader yields records (the values of the requested columns) in a fixed order; a record's
index in that order is its identity (the `record` half of row_id), so the same input always
plans the same way.

The corpus is cut into pieces (row ranges of a Parquet file, byte ranges of a JSON Lines file,
groups of .txt files, row ranges of a saved dataset) of about PIECE_BYTES of input, so planning
runs as one Dask task per piece. Each piece knows its first record's index before any of it is
tokenized (from Parquet metadata, or a newline count of its bytes), so pieces plan independently.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from softlabels.data.errors import UserError
from softlabels.data.store import is_url, reaching, store
from softlabels.generate.fingerprint import fingerprint_files

PIECE_BYTES = 4 << 20  # ~1M tokens of text: ~1-2 s of tokenizing; 10k pieces at 10B tokens

FORMATS = "a Parquet file or folder, a .jsonl file, .txt files, or a datasets.save_to_disk folder"


@dataclass(frozen=True)
class Piece:
    """Records [first_record, first_record + records) of the corpus: `files` with a kind-specific
    range [start, end) (Parquet or dataset rows, JSON Lines bytes; unused for .txt)."""

    index: int
    files: tuple[str, ...]
    start: int
    end: int
    first_record: int
    records: int
    first_line: int = 1  # JSON Lines: the line number of `start`, for error messages


@dataclass(frozen=True)
class Corpus:
    kind: str  # parquet | jsonl | txt | datasets
    files: tuple[Path, ...]  # (URLs for an input in a store: Parquet or JSON Lines)
    root: Path
    columns: tuple[str, ...]

    def fingerprint(self, rehash: bool = False) -> str:
        """Content hash of the input files (and the columns read), for plans and provenance."""
        if is_url(self.root):
            return url_fingerprint(self.files, self.root) + ":" + ",".join(self.columns)
        return (fingerprint_files(list(self.files), self.root, rehash) + ":"
                + ",".join(self.columns))

    def pieces(self, piece_bytes: int = PIECE_BYTES) -> list[Piece]:
        """The corpus in order, cut into pieces of about `piece_bytes` of input each."""
        out: list[Piece] = []
        first = 0

        def add(files, start, end, records, first_line=1):
            nonlocal first
            if records:
                out.append(Piece(len(out), tuple(map(str, files)), start, end, first, records,
                                 first_line))
                first += records

        if self.kind == "parquet":
            import pyarrow.parquet as pq

            for f in self.files:  # file rows [start, end); a large row group is split
                pf = pq.ParquetFile(_source(f))
                self._check_column(pf.schema_arrow.names, f)
                start = row = 0
                size = 0.0
                for g in range(pf.num_row_groups):
                    rg = pf.metadata.row_group(g)
                    per, left = rg.total_byte_size / max(rg.num_rows, 1), rg.num_rows
                    while left:
                        take = min(left, max(1, math.ceil((piece_bytes - size) / per)))
                        size, left, row = size + take * per, left - take, row + take
                        if size >= piece_bytes:
                            add([f], start, row, row - start)
                            start, size = row, 0.0
                add([f], start, row, row - start)
        elif self.kind == "jsonl":
            for f in self.files:
                with _open(f) as fh:
                    start, line = 0, 1
                    while block := fh.read(piece_bytes):
                        if not block.endswith(b"\n"):
                            block += fh.readline()
                        lines = block.split(b"\n")
                        add([f], start, start + len(block), sum(1 for x in lines if x.strip()),
                            line)
                        start, line = start + len(block), line + block.count(b"\n")
        elif self.kind == "txt":
            group, size = [], 0
            for f in self.files:
                group.append(f)
                size += f.stat().st_size
                if size >= piece_bytes or f == self.files[-1]:
                    add(group, 0, 0, len(group))
                    group, size = [], 0
        else:
            ds = self._dataset()
            per = max(1, int(piece_bytes * len(ds) / max(ds.data.nbytes, 1)))
            for a in range(0, len(ds), per):
                add([self.root], a, min(a + per, len(ds)), min(a + per, len(ds)) - a)
        return out

    def records(self, piece: Piece) -> Iterator[tuple]:
        """One tuple of column values per record of `piece`, in input order."""
        return {
            "parquet": self._parquet,
            "jsonl": self._jsonl,
            "txt": self._txt,
            "datasets": self._datasets,
        }[self.kind](piece)

    def _check_column(self, names: list[str], where: object) -> None:
        for c in self.columns:
            if c not in names:
                raise UserError(
                    f"{where} has no column {c!r} (columns: {', '.join(names)}); "
                    "pass the right one with --text-column (or --prompt-column, "
                    "--response-column, --messages-column)"
                )

    def _parquet(self, piece: Piece) -> Iterator[tuple]:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(_source(piece.files[0]))
        first = 0  # the file row that starts row group g
        for g in range(pf.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if first < piece.end and first + n > piece.start:
                a, b = max(piece.start - first, 0), min(piece.end - first, n)
                t = pf.read_row_group(g, columns=list(self.columns)).slice(a, b - a)
                yield from zip(*(t.column(c).to_pylist() for c in self.columns))
            first += n

    def _jsonl(self, piece: Piece) -> Iterator[tuple]:
        f = piece.files[0]
        with _open(f) as fh:
            fh.seek(piece.start)
            block = fh.read(piece.end - piece.start)
        for n, line in enumerate(block.split(b"\n"), piece.first_line):
            if not line.strip():
                continue
            try:
                obj = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise UserError(f"{f} line {n} is not valid UTF-8 ({e.reason}); "
                                "re-encode the file as UTF-8") from e
            except json.JSONDecodeError as e:
                raise UserError(f"{f} line {n} is not valid JSON ({e.msg})") from e
            if not isinstance(obj, dict):
                raise UserError(f"{f} line {n} is not a JSON object")
            self._check_column(list(obj), f"{f} line {n}")
            yield tuple(obj[c] for c in self.columns)

    def _txt(self, piece: Piece) -> Iterator[tuple]:
        if len(self.columns) != 1:
            raise UserError(".txt input holds plain text: use Parquet or JSON Lines for "
                            "prompt/response or messages columns")
        for f in piece.files:
            try:
                yield (Path(f).read_bytes().decode("utf-8"),)
            except UnicodeDecodeError as e:
                raise UserError(f"{f} is not valid UTF-8 (byte {e.start}: {e.reason}); "
                                "re-encode it as UTF-8") from e

    def _dataset(self):
        import datasets

        ds = datasets.load_from_disk(str(self.root))
        if isinstance(ds, datasets.DatasetDict):
            raise UserError(f"{self.root} holds splits {list(ds)}; pass one split's folder")
        self._check_column(ds.column_names, self.root)
        return ds

    def _datasets(self, piece: Piece) -> Iterator[tuple]:
        ds = self._dataset().select_columns(list(self.columns))
        for a in range(piece.start, piece.end, 1024):
            batch = ds[a : min(a + 1024, piece.end)]
            yield from zip(*(batch[c] for c in self.columns))


def _source(f):
    """What pyarrow opens: a local path itself (its native reader), a URL through fsspec."""
    return _open(f) if is_url(f) else f


def _open(f):
    """A binary file object of a local path or a URL (fsspec: read in blocks, seekable)."""
    if not is_url(f):
        return open(f, "rb")
    import fsspec

    with reaching(f):
        return fsspec.open(f, "rb").open()


def url_fingerprint(files, root: str) -> str:
    """An input in a store, by content: sha256 over (name, sha256 of its bytes), the bytes read
    once here (planning reads them again; a store has no mtime to cache a hash by)."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(files):
        d = hashlib.sha256()
        with _open(f) as fh:
            while block := fh.read(1 << 22):
                d.update(block)
        name = f[len(root.rstrip("/")) + 1:] if f != root else f.rsplit("/", 1)[-1]
        h.update(name.encode() + b"\0" + d.hexdigest().encode() + b"\0")
    return h.hexdigest()


def _open_url_corpus(url: str, columns) -> Corpus:
    """Parquet or JSON Lines files at a URL (one file, or every one under a prefix)."""
    st = store(url)
    kinds = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl"}
    suffix = "." + url.rsplit(".", 1)[-1].lower() if "." in url.rsplit("/", 1)[-1] else ""
    with reaching(url):
        if suffix in kinds and st.fs.isfile(st.root):
            return Corpus(kinds[suffix], (url,), url.rsplit("/", 1)[0], columns)
        found = sorted(st.fs.find(st.root)) if st.fs.isdir(st.root) else []
    for kind in ("parquet", "jsonl"):
        files = tuple(f"{url.rstrip('/')}/{p[len(st.root.rstrip('/')) + 1:]}" for p in found
                      if kinds.get("." + p.rsplit(".", 1)[-1].lower()) == kind)
        if files:
            return Corpus(kind, files, url.rstrip("/"), columns)
    if bucket := st.bucket_missing():
        raise UserError(f"input {url}: bucket '{bucket}' does not exist (or these credentials "
                        "cannot see it)")
    raise UserError(f"input {url} holds no .parquet or .jsonl files (a URL input is Parquet or "
                    "JSON Lines; copy other kinds to a folder)")


def open_corpus(path: str | os.PathLike, columns: tuple[str, ...] = ("text",)) -> Corpus:
    """Find what kind of input `path` is; fail with a one-line message if it is none."""
    if is_url(path):
        return _open_url_corpus(path, columns)
    p = Path(path)
    if not p.exists():
        raise UserError(f"input {p} does not exist; pass {FORMATS}")
    if p.is_file():
        kind = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".txt": "txt"}.get(
            p.suffix.lower()
        )
        if kind is None:
            raise UserError(f"input {p}: unknown file type {p.suffix!r}; pass {FORMATS}")
        return Corpus(kind, (p,), p.parent, columns)
    if (p / "state.json").is_file() and (p / "dataset_info.json").is_file():
        files = tuple(sorted(p.glob("*.arrow"))) + (p / "state.json",)
        return Corpus("datasets", files, p, columns)
    for kind, patterns in [("parquet", ["*.parquet"]), ("jsonl", ["*.jsonl"]), ("txt", ["*.txt"])]:
        files = tuple(sorted(f for pat in patterns for f in p.rglob(pat) if f.is_file()))
        if files:
            return Corpus(kind, files, p, columns)
    raise UserError(f"input folder {p} holds no usable files; pass {FORMATS}")
