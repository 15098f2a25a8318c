"""Distributed planning (issue 10): tokens/s of planning with 2 Dask workers vs 1, same run.

    python bench/plan.py [--tokens 20000000] [--vocab 8192]

The KJV records are repeated into a Parquet corpus of --tokens (row groups of 2,000 records);
a byte-level BPE tokenizer of --vocab is trained on them. Each configuration starts a
LocalCluster of N single-threaded worker processes, then times what `generate` does before the
teacher: cut the corpus into pieces, run one planning task per piece, write plan.json. The
tokenizer's own threads are switched off in the workers (TOKENIZERS_PARALLELISM=false) so that
N workers use N cores; the in-process planner with the tokenizer's threads on (this machine's
2 cores) is measured too, as the single-process baseline.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "data" / "corpus" / "kjv-train.parquet"


def plan_on_cluster(n_workers: int, corpus, tok_path: Path, job, out: Path) -> float:
    from distributed import Client, LocalCluster, wait

    from softlabels.generate.plan import claim, finish_plan
    from softlabels.generate.records import Fields
    from softlabels.generate.work import PlanTask, plan_task

    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                      host="127.0.0.1", dashboard_address=None,
                      env={"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}) as cl, \
            Client(cl) as c:
        c.run(lambda: __import__("transformers"))  # imports are not planning
        t = time.perf_counter()
        claim(out, job)
        pieces = corpus.pieces(job.piece_bytes)
        futures = [c.submit(plan_task, PlanTask(str(out), corpus, p, job, Fields(),
                                                str(tok_path)), pure=False) for p in pieces]
        wait(futures)
        plan = finish_plan(out, job, [f.result() for f in futures])
        return plan.tokens, time.perf_counter() - t, len(pieces)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=20_000_000)
    ap.add_argument("--vocab", type=int, default=8192)
    a = ap.parse_args()
    from transformers import AutoTokenizer

    from softlabels.demo import make_tokenizer
    from softlabels.generate.inputs import PIECE_BYTES, open_corpus
    from softlabels.generate.plan import Job, make_plan
    from softlabels.generate.records import Fields

    texts = pq.read_table(CORPUS).column("text").to_pylist()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        make_tokenizer(texts, vocab_size=a.vocab, path=d / "tok")
        tok = AutoTokenizer.from_pretrained(d / "tok")
        per = sum(len(ids) for ids in tok(texts)["input_ids"])
        reps = -(-a.tokens // per)
        pq.write_table(pa.table({"text": texts * reps}), d / "corpus.parquet",
                       row_group_size=2000)
        corpus = open_corpus(d / "corpus.parquet", ("text",))
        job = Job("bench", corpus.fingerprint(), k=64, max_length=2048, unit_tokens=131072,
                  logprob_step=1 / 16, shard_tokens=1 << 22, piece_bytes=PIECE_BYTES)
        rows = []
        t = time.perf_counter()
        plan = make_plan(corpus, tok, job, d / "serial", Fields())
        rows.append(("1 process, in-process (tokenizer threads on)", plan.tokens,
                     time.perf_counter() - t, "-"))
        for n in (1, 2):
            out = d / f"plan-{n}"
            tokens, wall, n_pieces = plan_on_cluster(n, corpus, d / "tok", job, out)
            rows.append((f"{n} Dask worker{'s' if n > 1 else ''}", tokens, wall, n_pieces))
            if n == 2:  # the same plan whatever the number of workers
                assert (out / ".softlabels/plan.json").read_text() == \
                    (d / "plan-1/.softlabels/plan.json").read_text()
            shutil.rmtree(out / ".softlabels" / "plan")
    print(f"corpus: {rows[0][1]:,} tokens ({reps} x KJV train), vocabulary {a.vocab}, "
          f"{os.cpu_count()} cores\n")
    print("| planner | tokens | pieces | wall s | tokens/s |")
    print("|---|---|---|---|---|")
    for name, tokens, wall, n_pieces in rows:
        print(f"| {name} | {tokens:,} | {n_pieces} | {wall:.1f} | {tokens / wall:,.0f} |")
    print(f"\n2 workers / 1 worker: {rows[1][2] / rows[2][2]:.2f}x the tokens/s")


if __name__ == "__main__":
    main()
