"""`softlabels verify DIR`: check the files against the manifest and the values against the format.

Every problem is collected (not just the first), each naming its shard, so one run tells a
user which shards to regenerate.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from softlabels.data.checks import bad_rows
from softlabels.data.counts import count_rows, read_row_counts
from softlabels.data.dataset import load_tokenizer, sha256_file
from softlabels.data.format import Encoding, FormatError
from softlabels.data.manifest import Manifest


def verify(directory: str | os.PathLike) -> list[str]:
    """Return every problem found; an empty list means the dataset is intact."""
    d = Path(directory)
    try:
        m = Manifest.load(d)
    except FormatError as e:
        return [str(e)]
    problems: list[str] = []
    try:
        tok = load_tokenizer(d)
    except Exception as e:  # noqa: BLE001 - a damaged tokenizer folder is a finding
        tok = None
        problems.append(f"tokenizer/: cannot be loaded ({' '.join(str(e).split())})")
    n_tok = len(tok) if tok is not None else None
    if not m.shards:
        problems.append(f"{d / 'manifest.json'} lists no shards: an empty dataset")
    seen: dict[str, str] = {}
    for s in m.shards:
        path = d / s.file
        where = f"{s.file}:"
        if not path.is_file():
            problems.append(f"{where} missing")
            continue
        if sha256_file(path) != s.sha256:
            problems.append(f"{where} sha256 differs from the manifest (file changed or damaged)")
        try:
            pf = pq.ParquetFile(path)
            enc = Encoding.from_schema(pf.schema_arrow)
            if not enc.matches(m):
                problems.append(f"{where} format {enc.version}, k/step/draws "
                                f"{enc.k}/{enc.logprob_step}/{enc.draws} != manifest "
                                f"{m.format_version}, {m.k}/{m.logprob_step}/{m.draws}")
                continue
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
