"""`softlabels import` and `softlabels export`: soft-label datasets in other tools' layouts into
this format, and this format into theirs, streamed a piece at a time.

Import: the source (a folder, file or URL of Parquet files; or a local `save_to_disk` folder) is
cut into pieces (consecutive row groups of a Parquet file, up to PIECE_BYTES; one Arrow file);
a Dask worker turns a piece into one shard, written atomically beside a record of it
(`.softlabels/import/<piece>.json`), so a rerun after any interruption converts only the
pieces without a record. Rows are named "<source row>:<document>" (a packed DistillKit row holds
several documents), so every source row is in the dataset exactly once, or named in the manifest
as having no target. The manifest comes last. What the source lacks is stated in the manifest's
version 5 flags and the card; `softlabels train` refuses what needs it.

Export: the shards are read (verified) and written as the other tool's columns, a Parquet file
per shard, row group by row group, with a card saying what was dropped.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from softlabels.data import axolotl, distillkit
from softlabels.data.atomic import atomic_path, write_text
from softlabels.data.dataset import MANIFEST, ShardInfo, load_tokenizer, save_tokenizer
from softlabels.data.errors import UserError
from softlabels.data.format import (
    DEFAULT_LOGPROB_STEP,
    FORMAT_VERSION,
    Encoding,
    FormatError,
    check_logprob_step,
)
from softlabels.data.store import store

KINDS = ("distillkit", "axolotl")
PIECE_BYTES = 64 << 20  # source bytes per piece (one shard each; a worker's unit of work)
BATCH_ROWS = 16  # source rows decoded at once
EXPORT_ROWS = 64  # rows per written batch (each an axolotl row group)
STATE = ".softlabels"


@dataclass(frozen=True)
class Piece:
    """Consecutive rows of one source file: row groups [first, first + count) of a Parquet file,
    or a whole Arrow file (count 0)."""

    index: int
    file: str  # relative to the source
    groups: tuple[int, int]
    first_row: int  # the global source row of its first row
    rows: int
    bytes: int


@dataclass
class ImportJob:
    """Everything that decides an import's output: a rerun with any of it changed is refused."""

    kind: str
    source: str
    files: list  # [name, bytes, version tag (mtime or ETag)]
    vocab_size: int
    k: int
    logprob_step: float
    tokenizer_sha256: str
    compression: dict | None = None  # DistillKit's config
    softlabels: str = ""
    format_version: int = FORMAT_VERSION
    pieces: list = field(default_factory=list, compare=False)

    @property
    def id(self) -> str:
        d = {k: v for k, v in asdict(self).items() if k != "pieces"}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:8]

    @property
    def encoding(self) -> Encoding:
        return Encoding(self.k, self.logprob_step, exact_tail=False, label_logprobs=False,
                        topk_renormalised=self.kind == "axolotl")

    def shard(self, piece: Piece) -> str:
        return f"shard-{piece.index:05d}-{self.id}.parquet"


@dataclass(frozen=True)
class PieceTask:
    """What a worker needs to turn one piece into a shard (no open files: it is pickled)."""

    job: ImportJob
    piece: Piece
    out: str  # the output folder

    def record(self) -> Path:
        return Path(self.out) / STATE / "import" / f"{self.piece.index:05d}.json"


# ------------------------------------------------------------------------ the source


def _files(src: str) -> list[dict]:
    """The source's data files, in order: [{name, bytes, tag, layout}]. A Parquet file, a folder
    (or URL prefix) of them, or a local `save_to_disk` folder (its Arrow files, in its order)."""
    st = store(src)
    fs, root = st.fs, st.root.rstrip("/")
    if not fs.exists(root):
        if bucket := st.bucket_missing():
            raise UserError(f"{src}: bucket {bucket!r} does not exist (or these credentials "
                            "cannot see it)")
        raise UserError(f"{src} does not exist")
    if fs.isfile(root):
        entries = [fs.info(root)]
        root = root.rsplit("/", 1)[0]
    else:
        if fs.exists(f"{root}/dataset_dict.json"):
            raise UserError(f"{src} is a DatasetDict folder: give one split's folder "
                            f"({src.rstrip('/')}/train)")
        if fs.exists(f"{root}/state.json"):
            if st.local is None:
                raise UserError(f"{src}: a save_to_disk folder is read from a local disk; copy "
                                "it here, or give the dataset's Parquet files")
            state = json.loads(fs.cat_file(f"{root}/state.json"))
            entries = [fs.info(f"{root}/{f['filename']}") for f in state["_data_files"]]
        else:
            entries = sorted((e for e in fs.find(root, detail=True).values()
                              if e["name"].endswith(".parquet")
                              and not Path(e["name"]).name.startswith(".")),
                             key=lambda e: e["name"])
    out = []
    for e in entries:
        name = e["name"].rstrip("/")
        layout = "arrow" if name.endswith(".arrow") else "parquet"
        tag = str(e.get("ETag") or e.get("etag") or e.get("mtime") or e.get("LastModified", ""))
        out.append({"name": name[len(root) + 1:] if name.startswith(root + "/") else name,
                    "path": name, "bytes": int(e["size"]), "tag": tag, "layout": layout})
    if not out:
        raise UserError(f"{src} holds no Parquet files (nor a save_to_disk folder)")
    return out


def _folder(src: str) -> str:
    """The source's folder: `src`, or the folder holding it when it is one file (where its
    compression config and tokenizer are looked for, and its files named from)."""
    st = store(src)
    return src.rstrip("/").rsplit("/", 1)[0] if st.fs.isfile(st.root.rstrip("/")) else src


def _open(src: str, path: str):
    """A file of the source: the path itself when local (pyarrow's own reader), else an fsspec
    file read by ranges."""
    st = store(src)
    return path if st.local is not None else st.fs.open(path, "rb", block_size=4 << 20)


def _schema_and_pieces(src: str, files: list[dict]) -> tuple[pa.Schema, list[Piece]]:
    """The first file's schema (every file must have its columns) and the pieces."""
    pieces, row, schema = [], 0, None
    for f in files:
        where = f"{src.rstrip('/')}/{f['name']}"
        try:
            if f["layout"] == "arrow":
                with pa.memory_map(f["path"]) as mm:
                    reader = pa.ipc.open_stream(mm)
                    s, n = reader.schema, sum(b.num_rows for b in reader)
                groups = [(0, 0, n, f["bytes"])]
            else:
                md = pq.read_metadata(_open(src, f["path"]))
                s = md.schema.to_arrow_schema()
                groups = [(g, 1, md.row_group(g).num_rows,
                           sum(md.row_group(g).column(c).total_compressed_size
                               for c in range(md.num_columns)))
                          for g in range(md.num_row_groups)]
        except (pa.ArrowException, OSError, ValueError) as e:
            raise UserError(f"{where}: not readable as {f['layout']} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from e
        if schema is None:
            schema = s
        elif missing := set(schema.names) - set(s.names):
            raise UserError(f"{where} lacks the column(s) {', '.join(sorted(missing))} of "
                            f"{files[0]['name']}: one dataset's files have the same columns")
        cur = None
        for g, count, n, size in groups:  # consecutive row groups up to PIECE_BYTES a piece
            if cur is None or cur["bytes"] + size > PIECE_BYTES:
                if cur is not None:
                    pieces.append(cur)
                cur = {"file": f["name"], "first": g, "count": 0, "row": row, "rows": 0,
                       "bytes": 0}
            cur["count"] += count
            cur["rows"] += n
            cur["bytes"] += size
            row += n
        if cur is not None:
            pieces.append(cur)
    return schema, [Piece(i, p["file"], (p["first"], p["count"]), p["row"], p["rows"],
                          p["bytes"]) for i, p in enumerate(pieces)]


def _batches(src: str, file: dict, piece: Piece, columns: list[str]):
    """The piece's rows, BATCH_ROWS at a time, only `columns`."""
    if file["layout"] == "arrow":
        with pa.memory_map(file["path"]) as mm:
            for b in pa.ipc.open_stream(mm):
                b = b.select(columns)
                for a in range(0, b.num_rows, BATCH_ROWS):
                    yield b.slice(a, BATCH_ROWS)
        return
    pf = pq.ParquetFile(_open(src, file["path"]))
    first, count = piece.groups
    yield from pf.iter_batches(BATCH_ROWS, row_groups=range(first, first + count),
                               columns=columns)


# ------------------------------------------------------------------------ import


def plan_import(src: str, out: str, kind: str, tokenizer: str | None = None,
                compression: str | None = None, vocab_size: int | None = None,
                logprob_step: float = DEFAULT_LOGPROB_STEP) -> ImportJob:
    """Check everything an import needs, in one line each, before any worker starts; then claim
    OUT for this job (its tokenizer and job record). A rerun of the same job finds its claim."""
    from softlabels import __version__
    from softlabels.data.store import is_url

    if kind not in KINDS:
        raise UserError(f"--from {kind!r}: choose from {', '.join(KINDS)}")
    check_logprob_step(logprob_step)
    if is_url(out) and not out.startswith("file://"):
        raise UserError(f"import writes a folder, not {out}: import here, then `softlabels push` "
                        "the folder")
    out = out.removeprefix("file://")
    files = _files(src)
    schema, pieces = _schema_and_pieces(src, files)
    need = {"distillkit": ("input_ids", *distillkit.COLUMNS), "axolotl": axolotl.COLUMNS}[kind]
    if missing := [c for c in need if c not in schema.names]:
        other = [k for k, cols in (("distillkit", distillkit.COLUMNS),
                                   ("axolotl", axolotl.COLUMNS[1:]))
                 if all(c in schema.names for c in cols)]
        legacy = "packed_indices" in schema.names and "coeffs" in schema.names
        raise UserError(f"{src} has no {', '.join(missing)} column(s): not {kind}'s layout" + (
            f" (it looks like {other[0]}'s: --from {other[0]})" if other else
            " (DistillKit's legacy layout, centred logits without a normaliser, cannot be "
            "imported)" if legacy else ""))
    tok = _tokenizer(src, tokenizer)
    vocab = len(tok)
    if vocab_size is not None:
        if vocab_size < vocab:
            raise UserError(f"--vocab-size {vocab_size} is smaller than the tokenizer's "
                            f"{vocab} tokens")
        vocab = vocab_size
    comp, k = None, 0
    if kind == "distillkit":
        comp = _compression(src, compression)
        k = comp.k
        _check_widths(src, files[0], pieces[0], comp)
    else:
        k = _axolotl_k(src, files[0], pieces[0])
    job = ImportJob(kind, src, [[f["name"], f["bytes"], f["tag"]] for f in files], vocab, k,
                    logprob_step, _tokenizer_hash(tok), comp.as_dict() if comp else None,
                    __version__)
    job.pieces = pieces
    _claim(Path(out), job, tok)
    return job


def _tokenizer(src: str, given: str | None):
    """--tokenizer, else the one the source carries (a tokenizer/ folder, or tokenizer files
    beside the data), else a one-line refusal."""
    if given:
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(given)
        except (OSError, ValueError) as e:
            raise UserError(f"--tokenizer {given}: cannot be loaded "
                            f"({str(e).splitlines()[0]})") from e
    root = _folder(src)
    tok = load_tokenizer(root)  # root/tokenizer/
    if tok is None and store(root).exists("tokenizer_config.json"):
        from transformers import AutoTokenizer

        if store(root).local is not None:
            tok = AutoTokenizer.from_pretrained(store(root).local)
    if tok is None:
        raise UserError(f"{src} carries no tokenizer (tokenizer/ or tokenizer_config.json): give "
                        "the teacher's with --tokenizer DIR; its vocabulary is the dataset's")
    return tok


def _tokenizer_hash(tok) -> str:
    return hashlib.sha256(json.dumps(tok.get_vocab(), sort_keys=True).encode()
                          + str(len(tok)).encode()).hexdigest()


def _compression(src: str, given: str | None) -> distillkit.Compression:
    """--compression-config FILE, else the source's compression_config.yaml."""
    import yaml

    if given:
        if not os.path.isfile(given):
            raise UserError(f"--compression-config {given} does not exist")
        text, where = Path(given).read_text(), given
    else:
        root = store(_folder(src))
        if not root.exists(distillkit.CONFIG_FILE):
            raise UserError(f"{src} has no {distillkit.CONFIG_FILE} (Arcee's packed sets ship "
                            "without one): give it with --compression-config FILE, the "
                            "`teacher.logprob_compressor` settings of the set's card")
        text, where = root.cat(distillkit.CONFIG_FILE).decode(), root.where(
            distillkit.CONFIG_FILE)
    try:
        d = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{where} is not valid YAML ({str(e).splitlines()[0]})") from e
    return distillkit.Compression.from_dict(d, where)


def _check_widths(src: str, file: dict, piece: Piece, c: distillkit.Compression) -> None:
    """The first row's bytes per position against the config's, before any worker starts."""
    for b in _batches(src, file, piece, list(distillkit.COLUMNS)):
        for i in range(b.num_rows):
            values, indices = (b.column(n)[i].as_py() for n in distillkit.COLUMNS)
            if values:
                distillkit.check_bytes(c, len(values[0]), len(indices[0]),
                                       f"{src.rstrip('/')}/{file['name']}: row {i}")
                return


def _axolotl_k(src: str, file: dict, piece: Piece) -> int:
    """K of an axolotl dataset: the width of its first row's first target row."""
    for b in _batches(src, file, piece, ["target_token_ids"]):
        col = b.column(0)
        for i in range(b.num_rows):
            row = col[i].as_py()
            if row:
                return len(row[0])
    raise UserError(f"{src}: its first piece has no target rows")


def _claim(out: Path, job: ImportJob, tok) -> None:
    """OUT holds nothing, or this job's earlier, interrupted run (or its finished dataset):
    anything else is refused in one line naming what differs."""
    record = out / STATE / "import.json"
    if record.is_file():
        old = json.loads(record.read_text())
        mine = {k: v for k, v in asdict(job).items() if k != "pieces"}
        if old != mine:
            what = ", ".join(k for k in mine if old.get(k) != mine[k])
            raise UserError(f"{out} holds an import with other settings ({what} differ): rerun "
                            "the same command, or import into a new folder")
        return
    if out.exists() and any(p.name != STATE for p in out.iterdir()):
        raise UserError(f"{out} is not empty: import into a new folder")
    out.mkdir(parents=True, exist_ok=True)
    save_tokenizer(tok, out)
    write_text(record, json.dumps({k: v for k, v in asdict(job).items() if k != "pieces"},
                                  indent=1) + "\n")


def tasks(job: ImportJob, out: str) -> list[PieceTask]:
    """The pieces still to convert (those without a record)."""
    all_ = [PieceTask(job, p, out) for p in job.pieces]
    return [t for t in all_ if not t.record().is_file()]


def import_piece(task: PieceTask) -> dict | UserError:
    """One piece into one shard, then its record (both atomic): what a worker runs. A source
    that breaks the layout comes back as the UserError (returned, so Dask logs no traceback)."""
    try:
        return _import_piece(task)
    except UserError as e:
        return e


def _import_piece(task: PieceTask) -> dict:
    from softlabels.data.shard import FAST_ZSTD_LEVEL, shard_writer

    job, piece = task.job, task.piece
    files = {f["name"]: f for f in _files_of(job)}
    file = files[piece.file]
    where = f"{job.source.rstrip('/')}/{piece.file}"
    if job.kind == "distillkit":
        comp = distillkit.Compression.from_dict(job.compression, "compression config")
        cols = ["input_ids", *distillkit.COLUMNS]
    else:
        cols = list(axolotl.COLUMNS)
    schema_names = _names(job.source, file)
    cols += [c for c in ("attention_mask", "labels") if c in schema_names
             and (job.kind == "distillkit" or c == "attention_mask")]
    stats = {"trimmed": 0, "packed": 0, "scaled": 0, "excess": 0.0, "skipped": [],
             "next_in_topk": 0, "same_in_topk": 0, "pairs": 0, "rows_in": 0}
    row = piece.first_row
    t0 = time.perf_counter()
    out = Path(task.out) / job.shard(piece)
    try:
        with shard_writer(out, job.encoding, level=FAST_ZSTD_LEVEL) as w:
            for batch in _batches(job.source, file, piece, cols):
                if job.kind == "distillkit":
                    rows, s = distillkit.read_rows(batch, row, comp, job.vocab_size,
                                                   job.logprob_step, where)
                else:
                    rows, s = axolotl.read_rows(batch, row, job.k, job.vocab_size, where)
                row += batch.num_rows
                for key, v in s.items():
                    stats[key] = max(stats[key], v) if key == "excess" else stats[key] + v
                _alignment(rows, stats)
                w.add(rows)
    except FormatError as e:  # (a row the format cannot hold: the same id twice in a position)
        raise UserError(f"{where}: {e}") from None
    if row - piece.first_row != piece.rows:
        raise UserError(f"{where}: {row - piece.first_row} rows read, {piece.rows} planned (the "
                        "file changed since the import began): import into a new folder")
    stats["rows_in"] = piece.rows
    record = {"piece": piece.index, "shard": asdict(w.info), **stats,
              "seconds": time.perf_counter() - t0, "source_bytes": piece.bytes}
    write_text(task.record(), json.dumps(record) + "\n")
    return record


def _files_of(job: ImportJob) -> list[dict]:
    """The job's source files as `_files` lists them (from the job record: no listing)."""
    root = store(_folder(job.source)).root.rstrip("/")
    return [{"name": n, "path": f"{root}/{n}", "bytes": b, "tag": t,
             "layout": "arrow" if n.endswith(".arrow") else "parquet"} for n, b, t in job.files]


def _names(src: str, file: dict) -> list[str]:
    if file["layout"] == "arrow":
        with pa.memory_map(file["path"]) as mm:
            return pa.ipc.open_stream(mm).schema.names
    return pq.read_schema(_open(src, file["path"])).names


def _alignment(rows, stats: dict) -> None:
    """How often the stored ids hold the row's next token (the alignment softlabels stores), and
    how often the token at the position itself (a source written one position late)."""
    for r in rows:
        t = np.flatnonzero(r.target_mask[:-1])
        if len(t):
            stats["next_in_topk"] += int((r.topk_ids[t] == r.input_ids[t + 1, None]).any(-1).sum())
            stats["same_in_topk"] += int((r.topk_ids[t] == r.input_ids[t, None]).any(-1).sum())
            stats["pairs"] += len(t)


def run_import(job: ImportJob, out: str, client, log=print) -> dict:
    """Convert every piece without a record on the cluster's workers, then publish. Returns the
    summary the command prints."""
    from distributed import as_completed
    from tqdm import tqdm

    todo = tasks(job, out)
    done = len(job.pieces) - len(todo)
    log(f"import: {len(job.pieces)} pieces of {job.source} ({sum(p.bytes for p in job.pieces)} "
        f"bytes), {done} already converted; Dask dashboard {client.dashboard_link}")
    t0 = time.perf_counter()
    bar = tqdm(total=len(todo), desc="import", unit="piece", file=sys.stderr)
    try:
        for f in as_completed(client.map(import_piece, todo, pure=False)):
            r = f.result()
            if isinstance(r, UserError):
                raise r
            bar.set_postfix(tokens=r["shard"]["tokens"])
            bar.update(1)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    m = publish_import(job, out)
    converted = sum(p.bytes for p in job.pieces if p in {t.piece for t in todo})
    return {"rows": m.rows, "tokens": m.tokens, "shards": len(m.shards),
            "seconds": round(seconds, 2),
            "source_mb_per_s": round(converted / 1e6 / seconds, 2) if todo else None,
            **{k: m.provenance[k] for k in ("source_bytes_per_token", "bytes_per_token")}}


def publish_import(job: ImportJob, out: str):
    """Every piece's record -> the manifest (shards in piece order), index and card; manifest
    last. Refuses if a piece has no record (its conversion failed: rerun)."""
    from softlabels import __version__
    from softlabels.data.card import publish
    from softlabels.data.manifest import Manifest

    records = []
    for t in (PieceTask(job, p, out) for p in job.pieces):
        if not t.record().is_file():
            raise UserError(f"piece {t.piece.index} ({t.piece.file}) was not converted; rerun "
                            "the same command")
        records.append(json.loads(t.record().read_text()))
    shards = [ShardInfo(**r["shard"]) for r in records]
    tokens = sum(s.tokens for s in shards)
    pairs = sum(r["pairs"] for r in records)
    skipped = [rid for r in records for rid in r["skipped"]]
    enc = job.encoding
    prov = {
        "imported_from": job.kind, "source": job.source, "source_files": len(job.files),
        "source_rows": sum(r["rows_in"] for r in records),
        "source_bytes": sum(f[1] for f in job.files),
        "source_bytes_per_token": round(sum(f[1] for f in job.files) / max(tokens, 1), 2),
        "bytes_per_token": round(sum(s.bytes for s in shards) / max(tokens, 1), 2),
        **({"compression_config": job.compression} if job.compression else {}),
        "rows_trimmed": sum(r["trimmed"] for r in records),
        "rows_packed": sum(r["packed"] for r in records),
        "positions_scaled_to_one": sum(r["scaled"] for r in records),
        "largest_excess_mass": max(r["excess"] for r in records),
        "records_without_targets": skipped,
        "next_token_in_topk": round(sum(r["next_in_topk"] for r in records) / max(pairs, 1), 4),
        "same_token_in_topk": round(sum(r["same_in_topk"] for r in records) / max(pairs, 1), 4),
        "tokenizer_vocab_size": len(load_tokenizer(out)), "softlabels": __version__,
        "command": " ".join(sys.argv), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                time.gmtime()),
    }
    m = Manifest(k=job.k, logprob_step=job.logprob_step, vocab_size=job.vocab_size,
                 provenance=prov, shards=shards, exact_tail=enc.exact_tail,
                 label_logprobs=enc.label_logprobs, topk_renormalised=enc.topk_renormalised)
    if not (Path(out) / MANIFEST).is_file():
        publish(out, m)
    return m


# ------------------------------------------------------------------------ export


def export_dataset(src, out: str, to: str, log=print) -> dict:
    """The dataset `src` (folder or URL, read verified) as `to`'s columns in the folder `out`:
    one Parquet file per shard, row group by row group, then the card."""
    from tqdm import tqdm

    from softlabels.data.manifest import Manifest
    from softlabels.data.reader import SoftLabelReader
    from softlabels.data.store import is_url

    if to != "axolotl":
        raise UserError(f"--to {to!r}: softlabels exports axolotl's layout (DistillKit's lossy "
                        "compression is not written; its trainer reads axolotl-style top-k "
                        "columns only through its own sampler)")
    if is_url(out):
        raise UserError(f"export writes a folder, not {out}; upload it with your store's tools")
    m = Manifest.load(src)
    if not m.k:
        raise UserError(f"{src} holds draws only (no top-k): axolotl's layout is a top-k")
    dest = Path(out)
    if dest.exists() and any(dest.iterdir()):
        raise UserError(f"{out} is not empty: export into a new folder")
    reader = SoftLabelReader(src)
    shard_of = reader.index(0).shard  # stored order: shard by shard, row group by row group
    n = len(m.shards)
    names = [f"data/train-{i:05d}-of-{n:05d}.parquet" for i in range(n)]
    rows = tokens = 0
    bar = tqdm(total=m.rows, desc="export", unit="row", file=sys.stderr)
    try:
        for si, name in enumerate(names):
            with atomic_path(dest / name) as tmp:
                with pq.ParquetWriter(tmp, axolotl.SCHEMA, compression="zstd") as w:
                    mine = np.flatnonzero(shard_of == si)
                    for a in range(0, len(mine), EXPORT_ROWS):
                        group = reader.read(0, mine[a: a + EXPORT_ROWS])
                        w.write_batch(axolotl.columns(group, m.k))
                        rows += len(group)
                        tokens += sum(len(r.input_ids) for r in group)
                        bar.update(len(group))
    finally:
        bar.close()
    write_text(dest / "README.md", _axolotl_card(m, src, names, rows, tokens))
    return {"rows": rows, "tokens": tokens, "files": len(names), "to": to}


def _axolotl_card(m, src, names: list[str], rows: int, tokens: int) -> str:
    from softlabels.data.card import front_matter

    dropped = ["the teacher's mass outside the top-k (axolotl renormalises over the "
               f"{m.k}; softlabels stores it" + (" exactly)" if m.exact else ")")]
    if m.label_logprobs:
        dropped.append("the teacher's log-prob of each real next token (the label residual)")
    if m.draws:
        dropped.append(f"the {m.draws} draws per position from the teacher's distribution")
    head = front_matter(names, ["knowledge-distillation", "axolotl"])
    return f"""{head}
# Top-{m.k} soft labels for axolotl's KD trainer

Exported by `softlabels export` from {src} ({rows} rows, {tokens} tokens): the columns axolotl's
KD trainer reads from prepared rows (`input_ids`, `attention_mask`, `labels`, `target_token_ids`,
`target_logprobs`, `target_mask`). Target row t is the teacher's distribution over the token
after `input_ids[0..t]`, its top-{m.k} renormalised over the {m.k} (temperature 1), in rank order;
positions without a target hold ids 0..{m.k - 1}, -inf and mask 0; `labels[t + 1]` is
`input_ids[t + 1]` where position t has a target, else -100.

Dropped (this layout has no place for them): {"; ".join(dropped)}.

Train with axolotl (`skip_prepare_dataset: true`, `kd_normalize_topk: true`); the config is in
the softlabels README, "Other tools' layouts".
"""
