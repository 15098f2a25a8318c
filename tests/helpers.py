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


def reference_topk(model_dir, token_lists, k):
    """Top-k log-probs of a plain transformers fp32 forward: [(T, k) ids, (T, k) logprobs]."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for ids in token_lists:
            logits = model(torch.tensor([ids])).logits[0].float()
            lp = torch.log_softmax(logits, -1)
            v, i = lp.topk(k, -1)
            out.append((i.numpy().astype(np.int32), v.numpy()))
    return out
