"""`softlabels demo`: the whole pipeline on the shipped corpus, each stage an ordinary subcommand.

Also home of the two builders the demo needs because no model hub is reachable: a byte-level
BPE tokenizer trained on the corpus and a small Llama-shaped model saved with save_pretrained.
"""

from __future__ import annotations

import os
from pathlib import Path


def make_tokenizer(texts: list[str], vocab_size: int, path: str | os.PathLike):
    """Train a byte-level BPE tokenizer on `texts` and save it HF-style into `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    )
    fast.save_pretrained(path)
    return fast


def make_model(
    path: str | os.PathLike,
    vocab_size: int,
    hidden: int,
    layers: int,
    heads: int,
    seed: int = 0,
    max_positions: int = 2048,
):
    """A randomly initialised LlamaForCausalLM saved in fp32 (head_dim 32+: vLLM-CPU needs it)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=hidden // heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(Path(path))
    return model


def add_arguments(p) -> None:
    p.add_argument("--output", default="demo_out", help="demo output folder (default demo_out)")


def main(args) -> int:
    raise NotImplementedError
