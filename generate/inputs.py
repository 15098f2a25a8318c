"""Input corpora: Parquet, JSON Lines, plain text, or a `datasets.save_to_disk` folder.

Every reader yields records (the values of the requested columns) in a fixed order; a record's
index in that order is its identity (the `record` half of row_id), so the same input always
plans the same way.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from softlabels.data.errors import UserError
from softlabels.data.manifest import fingerprint_files

FORMATS = "a Parquet file or folder, a .jsonl file, .txt files, or a datasets.save_to_disk folder"


@dataclass(frozen=True)
class Corpus:
    kind: str  # parquet | jsonl | txt | datasets
    files: tuple[Path, ...]
    root: Path
    columns: tuple[str, ...]

    def fingerprint(self, rehash: bool = False) -> str:
        """Content hash of the input files (and the columns read), for plans and provenance."""
        return (fingerprint_files(list(self.files), self.root, rehash) + ":"
                + ",".join(self.columns))

    def records(self) -> Iterator[tuple]:
        """One tuple of column values per record, in input order."""
        return {
            "parquet": self._parquet,
            "jsonl": self._jsonl,
            "txt": self._txt,
            "datasets": self._datasets,
        }[self.kind]()

    def _check_column(self, names: list[str], where: object) -> None:
        for c in self.columns:
            if c not in names:
                raise UserError(
                    f"{where} has no column {c!r} (columns: {', '.join(names)}); "
                    "pass the right one with --text-column (or --prompt-column, "
                    "--response-column, --messages-column)"
                )

    def _parquet(self) -> Iterator[tuple]:
        import pyarrow.parquet as pq

        for f in self.files:
            pf = pq.ParquetFile(f)
            self._check_column(pf.schema_arrow.names, f)
            for g in range(pf.num_row_groups):
                t = pf.read_row_group(g, columns=list(self.columns))
                yield from zip(*(t.column(c).to_pylist() for c in self.columns))

    def _jsonl(self) -> Iterator[str]:
        for f in self.files:
            with open(f, "rb") as fh:
                for n, line in enumerate(fh, 1):
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

    def _txt(self) -> Iterator[tuple]:
        if len(self.columns) != 1:
            raise UserError(".txt input holds plain text: use Parquet or JSON Lines for "
                            "prompt/response or messages columns")
        for f in self.files:
            try:
                yield (f.read_bytes().decode("utf-8"),)
            except UnicodeDecodeError as e:
                raise UserError(f"{f} is not valid UTF-8 (byte {e.start}: {e.reason}); "
                                "re-encode it as UTF-8") from e

    def _datasets(self) -> Iterator[tuple]:
        import datasets

        ds = datasets.load_from_disk(str(self.root))
        if isinstance(ds, datasets.DatasetDict):
            raise UserError(f"{self.root} holds splits {list(ds)}; pass one split's folder")
        self._check_column(ds.column_names, self.root)
        for batch in ds.select_columns(list(self.columns)).iter(batch_size=1024):
            yield from zip(*(batch[c] for c in self.columns))


def open_corpus(path: str | os.PathLike, columns: tuple[str, ...] = ("text",)) -> Corpus:
    """Find what kind of input `path` is; fail with a one-line message if it is none."""
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
