"""Context for later windows (issue 11, item 4): what `--stride` buys and costs.

    python bench/stride.py --teacher demo_out/teacher [--max-length 64] [--strides 64,32,16]

`make demo` leaves its trained teacher in demo_out/teacher. Held-out KJV records, cut to the
teacher's training length (256 tokens), are windowed exactly as `generate` windows them
(`plan.windows`) at --max-length with each stride; the teacher (transformers, fp32) scores every
window, and at each target position we take its log-prob of the real next token. Reported: the
teacher's mean NLL over all target positions and over the first 8 targets of later windows (where
a window without context knows least), and the tokens the teacher scores per target. One window
of the whole record (full context) is the reference. Stored soft targets are the teacher's
distributions at exactly these positions, so a worse teacher NLL there is a worse target.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

REPO = Path(__file__).resolve().parents[1]
HELDOUT = REPO / "data" / "corpus" / "kjv-heldout.parquet"


def score(model, ids: list[int], max_length: int, stride: int) -> tuple[np.ndarray, int]:
    """-> (the teacher's NLL of token p+1 at every position p < n-1, tokens it scored)."""
    from softlabels.generate.plan import windows

    nll, scored = np.zeros(len(ids) - 1), 0
    for a, t, b in windows(len(ids), max_length, stride):
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids[a:b]])).logits[0].double(), -1)
        scored += b - a
        for p in range(t, min(b, len(ids) - 1)):
            nll[p] = -lp[p - a, ids[p + 1]].item()
    return nll, scored


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--strides", default="64,32,16")
    ap.add_argument("--records", type=int, default=60)
    ap.add_argument("--record-tokens", type=int, default=256)
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(a.teacher)
    model = AutoModelForCausalLM.from_pretrained(a.teacher, dtype=torch.float32).eval()
    texts = pq.read_table(HELDOUT).column("text").to_pylist()[: a.records]
    recs = [tok(t).input_ids[: a.record_tokens] for t in texts]
    # the positions a window without context knows least: the first 8 of each later window
    early = np.concatenate([(np.arange(len(r) - 1) >= a.max_length)
                            & (np.arange(len(r) - 1) % a.max_length < 8) for r in recs])
    print(f"teacher {a.teacher}; {len(recs)} held-out records, {len(early):,} target positions "
          f"({early.sum():,} at the start of a later window); windows of {a.max_length}\n")
    print("| windows | teacher NLL, all targets | NLL, first 8 positions of later windows | "
          "tokens scored per target |")
    print("|---|---|---|---|")
    policies = [("whole record (reference)", a.record_tokens, 0)] + [
        (f"stride {s}" + (" (no overlap, the default)" if s == a.max_length else ""),
         a.max_length, s) for s in map(int, a.strides.split(","))]
    for name, L, S in policies:
        runs = [score(model, ids, L, S) for ids in recs]
        nll = np.concatenate([n for n, _ in runs])
        scored = sum(s for _, s in runs)
        print(f"| {name} | {nll.mean():.4f} | {nll[early].mean():.4f} | "
              f"{scored / len(nll):.2f} |")


if __name__ == "__main__":
    main()
