"""Test fixtures' building blocks: tiny real models and an independent transformers reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "data" / "corpus" / "kjv-train.parquet"


def corpus_texts(n: int, offset: int = 0) -> list[str]:
    return pq.read_table(CORPUS).column("text").to_pylist()[offset : offset + n]


def reference_targets(model_dir, token_lists, k):
    """What the teacher stores, from a plain transformers fp32 forward (float64 after the head),
    per window: (T, k) top-k ids and log-probs, (T,) log of the mass outside the top-k (summed
    outside it, not 1 - sum) and (T,) log-prob of the next token (NaN at the last position)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for ids in token_lists:
            logits = model(torch.tensor([ids])).logits[0].double()
            lp = torch.log_softmax(logits, -1)
            v, i = lp.topk(k, -1)
            tail = torch.logsumexp(lp.scatter(-1, i, -torch.inf), -1)
            label = np.full(len(ids), np.nan, np.float32)
            label[:-1] = lp[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()
            out.append((i.numpy().astype(np.int32), v.float().numpy(),
                        tail.float().numpy(), label))
    return out


def reference_topk(model_dir, token_lists, k):
    """[(T, k) ids, (T, k) logprobs] of `reference_targets`."""
    return [(i, v) for i, v, _, _ in reference_targets(model_dir, token_lists, k)]


def reference_rows(model_dir, token_lists, k, masks=None) -> list:
    """Rows "<i>:0" of these windows with the teacher's exact targets (`reference_targets`)."""
    from softlabels.data.format import Row

    rows = []
    for n, (ids, (i, v, tail, label)) in enumerate(
            zip(token_lists, reference_targets(model_dir, token_lists, k))):
        mask = np.ones(len(ids), bool) if masks is None else masks[n]
        rows.append(Row(f"{n}:0", np.asarray(ids, np.int32), i, v, mask, tail_logprob=tail,
                        label_logprob=label))
    return rows


def dask_env() -> dict:
    import os

    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="2", VLLM_LOGGING_LEVEL="ERROR", PYTHONPATH=str(REPO))
    return env


def start_dask(d: Path, n_workers: int, worker_names=None, tls: list[str] | None = None,
               security=None, worker_env: dict | None = None) -> dict:
    """Start `dask scheduler` and n `dask worker` processes on loopback (the standard commands).

    `tls`: the `--tls-ca-file/--tls-cert/--tls-key` arguments for both (and `security`, the
    matching client Security to wait for the workers with)."""
    import json
    import subprocess
    import sys
    import time

    bindir = Path(sys.executable).parent
    sched_file = d / "scheduler.json"
    log = open(d / "dask.log", "ab")
    sched = subprocess.Popen(
        [bindir / "dask", "scheduler", "--host", "127.0.0.1", "--port", "0",
         "--dashboard-address", "127.0.0.1:0", "--scheduler-file", sched_file,
         *(["--protocol", "tls", *tls] if tls else [])],
        stdout=log, stderr=log, env=dask_env(),
    )
    for _ in range(300):
        if sched_file.exists():
            break
        time.sleep(0.1)
    address = json.loads(sched_file.read_text())["address"]
    workers = [start_worker(d, address, name, tls, worker_env)
               for name in (worker_names or range(n_workers))]
    from distributed import Client

    with Client(address, timeout="30s", **({"security": security} if security else {})) as c:
        c.wait_for_workers(n_workers, timeout=60)
    return {"address": address, "scheduler": sched, "workers": workers}


def start_worker(d: Path, address: str, name, tls: list[str] | None = None,
                 env: dict | None = None):
    import subprocess
    import sys

    log = open(d / f"worker-{name}.log", "ab")
    return subprocess.Popen(
        [Path(sys.executable).parent / "dask", "worker", address, "--nworkers", "1",
         "--nthreads", "1", "--resources", "teacher=1", "--name", str(name),
         "--memory-limit", "0", "--no-dashboard", *(tls or [])],
        stdout=log, stderr=log, env={**dask_env(), **(env or {})},
        start_new_session=True,  # killpg = machine dies
    )


def stop_dask(procs: dict) -> None:
    for p in [*procs["workers"], procs["scheduler"]]:
        p.kill()
        p.wait()


def softlabels(*args, check=True, env=None, **kw):
    """Run the real `softlabels` command in a subprocess (`env`: more environment variables);
    return the CompletedProcess."""
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "softlabels", *map(str, args)],
                       capture_output=True, text=True, cwd=REPO, env={**dask_env(), **(env or {})},
                       **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"softlabels {args} exited {p.returncode}:\n{p.stderr[-3000:]}")
    return p


def read_dataset(path) -> dict:
    """{row_id: Row} of a dataset, through the package's reader."""
    from softlabels.data.reader import SoftLabelReader

    return {r.row_id: r for r in SoftLabelReader(path)}


def assert_same_targets(want_ids, want_lp, got_ids, got_lp, tol):
    """Per position: the same set of ids, each log-prob within tol, got sorted descending.

    Sets, not rank order: quantisation may swap ids whose log-probs differ by less than a step.
    """
    assert (np.diff(got_lp, axis=-1) <= 0).all(), "decoded targets are not in rank order"
    for t in range(len(want_ids)):
        want = dict(zip(want_ids[t].tolist(), want_lp[t].tolist()))
        got = dict(zip(got_ids[t].tolist(), got_lp[t].tolist()))
        assert want.keys() == got.keys(), f"position {t}: ids differ"
        assert max(abs(want[i] - got[i]) for i in want) <= tol, f"position {t}: values differ"


def synthetic_rows(n: int, vocab: int, k: int, seed: int, lengths=(8, 40), draws: int = 0,
                   prefix: str = "") -> list:
    """n rows of random lengths with random (valid) targets: a top-k with its exact tail and the
    label's log-prob from one random distribution per position, or `draws` draws from it."""
    from softlabels.data.format import Row
    from softlabels.generate.head import unique_counts

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        T = int(rng.integers(*lengths))
        lp = torch.log_softmax(torch.from_numpy(rng.normal(0, 3, (T, vocab))), -1)
        v, top = lp.topk(k, -1) if k else (torch.zeros(T, 0), torch.zeros(T, 0, dtype=torch.long))
        ids = rng.integers(0, vocab, T).astype(np.int32)
        label = np.full(T, np.nan, np.float32)
        label[:-1] = lp[:-1].gather(-1, torch.from_numpy(ids[1:, None]).long())[:, 0].numpy()
        row = Row(f"{prefix}{i}:0", ids, top.numpy().astype(np.int32), v.float().numpy(),
                  np.ones(T, bool), label_logprob=label,
                  tail_logprob=torch.logsumexp(lp.scatter(-1, top, -torch.inf), -1).float()
                  .numpy() if k else None)
        if draws:
            drawn = torch.multinomial(lp.exp(), draws, replacement=True,
                                      generator=torch.Generator().manual_seed(seed + i)).numpy()
            row.sample_ids, row.sample_counts = unique_counts(drawn)
        rows.append(row)
    return rows


def write_dataset(path, rows, k: int, vocab: int, draws: int = 0, tokenizer=None, shards=1):
    """A published dataset of these rows (with the tokenizer folder of `tokenizer`, a path)."""
    import shutil

    from softlabels.data.card import publish
    from softlabels.data.dataset import TOKENIZER_DIR
    from softlabels.data.format import DEFAULT_LOGPROB_STEP, Encoding
    from softlabels.data.manifest import Manifest
    from softlabels.data.shard import write_shard

    path.mkdir(parents=True, exist_ok=True)
    infos = [write_shard(path / f"shard-{s}.parquet", rows[s::shards],
                         Encoding(k, DEFAULT_LOGPROB_STEP, draws),
                         row_group_tokens=300) for s in range(shards)]
    publish(path, Manifest(k=k, logprob_step=DEFAULT_LOGPROB_STEP, vocab_size=vocab,
                           draws=draws, shards=infos))
    if tokenizer is not None:
        shutil.copytree(tokenizer, path / TOKENIZER_DIR)
    return path
