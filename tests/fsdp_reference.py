"""The model and data both sides of the FSDP test build: the same seed, the same micro-batches."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from softlabels.data.manifest import Manifest
from softlabels.data.reader import SoftLabelReader
from softlabels.train_student.config import TrainConfig

STUDENT = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 2, "num_attention_heads": 1, "num_key_value_heads": 1,
           "head_dim": 32, "max_position_embeddings": 256, "tie_word_embeddings": False}


def build(data: str):
    """(model, config, the dataset's resolved recipe)."""
    m = Manifest.load(data)
    cfg = dict(STUDENT, vocab_size=m.vocab_size)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    tc = TrainConfig(student="-", data=data, output="-", chunk=16)
    return model, tc, tc.recipe().for_dataset(m, data)


def micro_batches(data: str, n: int) -> list[list]:
    rows = list(SoftLabelReader(data))[: 3 * n]
    return [rows[i::n] for i in range(n)]
