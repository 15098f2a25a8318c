"""`softlabels verify DIR`: check the files against the manifest and the values against the format.

Every problem is collected (not just the first), each naming its shard, so one run tells a
user which shards to regenerate.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from softlabels.data.format import Encoding, FormatError, decode
from softlabels.data.manifest import Manifest
from softlabels.data.writer import sha256_file


def check_values(rows, vocab_size: int, step: float) -> list[str]:
    """Problems in decoded rows: ranges, order, probability mass."""
    problems = []
    # Rounding to the nearest step can raise each probability by at most exp(step / 2).
    max_mass = float(np.exp(step / 2)) + 1e-6
    for r in rows:
        m = r.target_mask
        lp, ids = r.topk_logprobs[m], r.topk_ids[m]
        why = []
        if len(r.target_mask) != len(r.input_ids) or len(r.topk_ids) != len(r.input_ids):
            why.append("column lengths differ")
        if r.input_ids.size and (r.input_ids.min() < 0 or r.input_ids.max() >= vocab_size):
            why.append(f"input id outside [0, {vocab_size})")
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            why.append(f"target id outside [0, {vocab_size})")
        if not np.isfinite(lp).all() or (lp > 0).any():
            why.append("log-probability not finite or > 0")
        if (np.diff(lp, axis=-1) > 0).any():
            why.append("targets not sorted by descending probability")
        if lp.size and np.exp(lp.astype(np.float64)).sum(-1).max() > max_mass:
            why.append("probabilities sum to more than 1")
        if len(ids) and (np.sort(ids, axis=-1)[:, 1:] == np.sort(ids, axis=-1)[:, :-1]).any():
            why.append("repeated id within a position's top-k")
        if why:
            problems.append(f"row {r.row_id}: " + ", ".join(why))
    return problems


def verify(directory: str | os.PathLike) -> list[str]:
    """Return every problem found; an empty list means the dataset is intact."""
    d = Path(directory)
    try:
        m = Manifest.load(d)
    except FormatError as e:
        return [str(e)]
    problems: list[str] = []
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
            if (enc.k, enc.logprob_step) != (m.k, m.logprob_step):
                problems.append(f"{where} k/step {enc.k}/{enc.logprob_step} != manifest")
                continue
            rows = tokens = 0
            shard_problems = []
            for g in range(pf.num_row_groups):
                decoded = decode(pf.read_row_group(g), enc)
                rows += len(decoded)
                tokens += sum(len(r.input_ids) for r in decoded)
                shard_problems += check_values(decoded, m.vocab_size, m.logprob_step)
                for r in decoded:
                    if r.row_id in seen:
                        shard_problems.append(f"row {r.row_id} also in {seen[r.row_id]}")
                    seen[r.row_id] = s.file
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
            problems.append(f"{where} unreadable ({type(e).__name__}: {e})")
    return problems
