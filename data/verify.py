"""`softlabels verify DIR`: check the files against the manifest and the values against the format.

Every problem is collected (not just the first), each naming its shard, so one run tells a
user which shards to regenerate. DIR may be a URL: each shard is then downloaded once, to a temp
file, and checked there (verify reads every byte; a student reads only what it trains on).
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from softlabels.data.checks import bad_rows
from softlabels.data.counts import count_rows, read_index, read_row_counts
from softlabels.data.dataset import hashes, load_tokenizer, sha256_file
from softlabels.data.format import Encoding, FormatError
from softlabels.data.manifest import Manifest
from softlabels.data.store import Store, store


@contextlib.contextmanager
def local_file(st: Store, name: str):
    """The file itself when the store is local, else a downloaded temp copy."""
    if st.local is not None:
        yield st.local / name
        return
    with tempfile.TemporaryDirectory(prefix="softlabels-verify-") as tmp:
        path = Path(tmp) / Path(name).name
        st.download(name, path)
        yield path


def verify(directory) -> list[str]:
    """Return every problem found; an empty list means the dataset is intact."""
    st = store(directory)
    try:
        m = Manifest.load(st)
    except FormatError as e:
        return [str(e)]
    problems: list[str] = []
    try:
        tok = load_tokenizer(st)
    except Exception as e:  # noqa: BLE001 - a damaged tokenizer folder is a finding
        tok = None
        problems.append(f"tokenizer/: cannot be loaded ({' '.join(str(e).split())})")
    n_tok = len(tok) if tok is not None else None
    if not m.shards:
        problems.append(f"{st.where('manifest.json')} lists no shards: an empty dataset")
    seen: dict[str, str] = {}
    truth: dict[int, np.ndarray] = {}  # each shard's (5, rows) index rows, as read from it
    for si, s in enumerate(m.shards):
        where = f"{s.file}:"
        if not st.exists(s.file):
            problems.append(f"{where} missing")
            continue
        with local_file(st, s.file) as path:
            problems += _shard(path, s, m, n_tok, seen, truth, si)
    if m.index is not None:
        problems += _index(st, m, truth)
    return problems


def _index(st: Store, m: Manifest, truth: dict) -> list[str]:
    """index.parquet: its hash, and every row's group and counts as the shards have them."""
    name = m.index["file"]
    if not st.exists(name):
        return [f"{name}: missing"]
    with local_file(st, name) as path:
        if sha256_file(path) != m.index["sha256"]:
            return [f"{name}: sha256 differs from the manifest (file changed or damaged)"]
        try:
            a = read_index(path.read_bytes(), m.shards)
        except FormatError as e:
            return [str(e)]
    problems = []
    for si, s in enumerate(m.shards):
        mine = a[:, a[0] == si]
        if si in truth and not (mine.shape == truth[si].shape and (mine == truth[si]).all()):
            problems.append(f"{name}: the rows of {s.file} differ from the shard's (row groups "
                            "or counts)")
    return problems


def _shard(path: Path, s, m: Manifest, n_tok: int | None, seen: dict, truth: dict,
           si: int) -> list[str]:
    where = f"{s.file}:"
    problems = []
    try:
        got = hashes(path)  # (one pass: the whole file's hash and its ranges')
    except (OSError, ValueError):  # not Parquet: the parse below names what is wrong with it
        got = {"sha256": sha256_file(path)}
    if got["sha256"] != s.sha256:
        problems.append(f"{where} sha256 differs from the manifest (file changed or damaged)")
    elif s.footer is not None:  # the file is the one published: are its range hashes?
        if (got.get("footer"), got.get("row_groups")) != (s.footer, s.row_groups):
            problems.append(f"{where} footer/row group hashes differ from the file's (the "
                            "manifest was changed after publishing)")
    try:
        pf = pq.ParquetFile(path)
        enc = Encoding.from_schema(pf.schema_arrow)
        if not enc.matches(m):
            problems.append(f"{where} format {enc.version}, k/step/draws "
                            f"{enc.k}/{enc.logprob_step}/{enc.draws} != manifest "
                            f"{m.format_version}, {m.k}/{m.logprob_step}/{m.draws}")
            return problems
        rows = tokens = 0
        shard_problems = []
        counted = []
        for g in range(pf.num_row_groups):
            t = pf.read_row_group(g)
            rows += t.num_rows
            counted.append(count_rows(t))
            tokens += int(counted[-1][0].sum())
            shard_problems += [f"row {rid}: {why}"
                               for rid, why in bad_rows(t, enc, m.vocab_size)]
            if n_tok is not None and n_tok < m.vocab_size:  # ids the tokenizer cannot make
                top = pc.max(pc.list_flatten(t.column("input_ids"))).as_py()
                if top is not None and top >= n_tok:
                    shard_problems.append(f"input id {top} is not a token of the dataset's "
                                          f"tokenizer ({n_tok} tokens)")
            for rid in t.column("row_id").to_pylist():
                if rid in seen:
                    shard_problems.append(f"row {rid} also in {seen[rid]}")
                seen[rid] = s.file
        sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
        if counted:
            truth[si] = np.vstack([np.full(rows, si), np.repeat(np.arange(len(sizes)), sizes),
                                   np.hstack(counted)])
        footer = read_row_counts(pf.metadata.metadata, pf.metadata.num_rows)
        if footer is not None and counted and (footer != np.hstack(counted)).any():
            problems.append(f"{where} footer row counts differ from the rows")
        if (rows, tokens) != (s.rows, s.tokens):
            problems.append(
                f"{where} {rows} rows/{tokens} tokens, manifest says {s.rows}/{s.tokens}"
            )
        problems += [f"{where} {p}" for p in shard_problems[:5]]
        if len(shard_problems) > 5:
            problems.append(f"{where} ... and {len(shard_problems) - 5} more row problems")
    except FormatError as e:
        problems.append(f"{where} {e}")
    except Exception as e:  # a damaged file can fail anywhere inside pyarrow
        why = " ".join(str(e).split())  # pyarrow's messages can span lines
        problems.append(f"{where} unreadable ({type(e).__name__}: {why})")
    return problems
