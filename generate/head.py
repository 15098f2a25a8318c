"""The teacher's output head, applied by softlabels to the final hidden states vLLM returns.

vLLM's prompt logprobs give only the top-k, and build (tokens, vocab) log-probs outside its memory
profiling. With the hidden states in hand the exact distribution is one matmul away: this module
loads the teacher's own head (lm_head, or the tied input embeddings), applies the architecture's
final transform (soft-capping, scaling), and turns a chunk of positions at a time into the exact
normaliser, the top-k and N draws, so at most (chunk, vocab) logits exist at once.

Draws are reproducible whatever the batching: each window draws its uniforms from its own
generator, seeded by (seed, row id), and inverts the cumulative distribution (`draw`). The
hidden states of a window do not depend on the other windows in vLLM's batch (measured: bitwise
equal), so neither do the draws.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from softlabels.data.errors import UserError
from softlabels.data.heads import logit_transform

CHUNK_BYTES = 256 << 20  # per chunk: its (positions, vocab) float32 logits and exponentials


@dataclass
class TeacherOutput:
    """One window's targets: (T, k) top-k in rank order; (T,) the exact log of the mass outside
    the top-k and the log-prob of the next token (NaN where it is not known); and the draws as
    (T, U) unique ids ascending with their counts (count 0 pads a position with fewer than U
    unique ids). With a top-k the draws come from outside it (format 3): stratified, the head
    exact and every draw spent on the tail, where the estimate is needed."""

    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    tail_logprob: np.ndarray
    label_logprob: np.ndarray
    sample_ids: np.ndarray | None = None
    sample_counts: np.ndarray | None = None


def window_seed(seed: int, row_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{row_id}".encode()).digest()[:8], "little") >> 1


class Head:
    """The teacher's output layer: (positions, hidden) -> top-k and draws, a chunk at a time."""

    def __init__(self, teacher: str | Path, dtype: torch.dtype, device: str = "cpu",
                 trust_remote_code: bool = False):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(teacher, trust_remote_code=trust_remote_code)
        self.transform = logit_transform(config)
        weight, self.bias = _load_head(Path(teacher), config, trust_remote_code)
        self.weight = weight.to(device=device, dtype=dtype)
        if self.bias is not None:
            self.bias = self.bias.to(device=device, dtype=dtype)
        self.device = device
        self.vocab = self.weight.shape[0]
        self.chunk = max(16, CHUNK_BYTES // (12 * self.vocab))  # logits, exp, exp outside

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.transform(torch.nn.functional.linear(
            h.to(self.device, self.weight.dtype), self.weight, self.bias).float())

    @torch.inference_mode()
    def outputs(self, h: torch.Tensor, k: int, labels: np.ndarray, draws: int = 0,
                temperature: float = 1.0, seed: int | None = None) -> TeacherOutput:
        """(T, hidden) final hidden states of one window and (T,) the token each position
        predicts (-1: unknown) -> its TeacherOutput. Every number comes from the same float32
        logits: the normaliser, the top-k, the mass outside them (summed from the exponentials
        outside them, never as 1 - sum, which cancels at confident positions), the label's
        log-prob and the draws."""
        if k and draws and temperature != 1:
            raise ValueError("draws beside a top-k come from the teacher at temperature 1")
        T = h.shape[0]
        ids = np.zeros((T, k), np.int32)
        lps = np.zeros((T, k), np.float32)
        tail = np.zeros(T, np.float32)
        label = np.full(T, np.nan, np.float32)
        drawn = np.zeros((T, draws), np.int64)
        no_tail = np.zeros(T, bool)  # with a top-k: positions where it holds all the mass
        if draws:
            gen = torch.Generator().manual_seed(seed)
            u = torch.rand((T, draws), generator=gen, dtype=torch.float64)
        known = torch.from_numpy(np.asarray(labels) >= 0)
        lab = torch.from_numpy(np.asarray(labels, np.int64)).clamp(min=0)
        for a in range(0, T, self.chunk):
            b = min(T, a + self.chunk)
            x = self.logits(h[a:b])
            x.sub_(x.max(-1, keepdim=True).values)  # <= 0: exp() cannot overflow
            e = torch.exp(x)  # (P, V) unnormalised probabilities
            log_z = e.sum(-1).log()  # (P,)
            at_label = x.gather(-1, lab[a:b, None].to(x.device))[:, 0] - log_z
            label[a:b] = torch.where(known[a:b].to(x.device), at_label, np.nan).cpu().numpy()
            weights = e if temperature == 1 else torch.exp(x / temperature)
            if k:
                v, i = x.topk(k, -1)
                ids[a:b] = i.cpu().numpy()
                lps[a:b] = (v - log_z[:, None]).cpu().numpy()
                outside = e.scatter(-1, i, 0.0)  # the mass the top-k leave, summed exactly
                rest, top = outside.sum(-1), e.gather(-1, i).sum(-1)
                # the log of the smaller side, without cancellation: log(rest) - log(z) loses a
                # small top-k mass (a flat position), log1p(-top / z) a small tail
                tail[a:b] = torch.where(rest < top, rest.log() - log_z,
                                        torch.log1p(-top / e.sum(-1))).cpu().numpy()
                weights = outside  # the top-k is stored exactly: draw where the estimate is needed
                no_tail[a:b] = (rest == 0).cpu().numpy()
            if draws:
                drawn[a:b] = draw(weights, u[a:b].to(weights.device)).cpu().numpy()
        t = TeacherOutput(ids, lps, tail, label)
        if draws:
            t.sample_ids, t.sample_counts = unique_counts(drawn)
            t.sample_counts[no_tail] = 0
        return t


def draw(weights: torch.Tensor, u: torch.Tensor, block: int = 64) -> torch.Tensor:
    """(P, V) unnormalised probabilities and (P, N) uniforms in [0, 1) -> (P, N) ids, by
    inverting the cumulative distribution in two levels: a block of ids (float64 running sums
    of the blocks), then an id within it. A zero-weight id is never drawn: searchsorted with
    right=True skips zero-width intervals. Two levels cost a fraction of one float64 cumulative
    sum over the whole vocabulary (measured 3x less at 32k)."""
    P, V = weights.shape
    nb = -(-V // block)
    w = torch.nn.functional.pad(weights, (0, nb * block - V)).view(P, nb, block)
    ends = w.sum(-1).double().cumsum_(-1)  # (P, nb)
    at = u * ends[:, -1:]
    bi = torch.searchsorted(ends, at, right=True).clamp_(max=nb - 1)  # (P, N)
    start = torch.where(bi > 0, ends.gather(-1, (bi - 1).clamp(min=0)), 0.0)
    frac = ((at - start) / (ends.gather(-1, bi) - start)).clamp_(0, 1)
    inner = w.gather(1, bi[..., None].expand(P, -1, block)).cumsum_(-1)  # (P, N, B)
    total = inner[..., -1:]
    j = torch.searchsorted(inner, (frac.float()[..., None] * total), right=True)[..., 0]
    # rounding may put the point at the block's end: take its last id with weight
    j = torch.minimum(j, (inner < total).sum(-1))
    return bi * block + j


def unique_counts(drawn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(T, N) draws -> (T, U) unique ids ascending and their counts, count 0 as padding."""
    s = np.sort(drawn, -1)
    T, N = s.shape
    new = np.ones_like(s, bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    slot = np.cumsum(new, -1) - 1  # each draw's unique-id slot within its position
    U = int(slot[:, -1].max()) + 1 if T else 0
    ids = np.zeros((T, U), np.int32)
    counts = np.zeros((T, U), np.uint16)
    rows = np.repeat(np.arange(T), N)
    ids[rows, slot.ravel()] = s.ravel()
    np.add.at(counts, (rows, slot.ravel()), 1)
    return ids, counts


def _load_head(teacher: Path, config, trust_remote_code: bool):
    """(weight, bias or None) of the output layer, read from the safetensors files alone: the
    parameter names come from the architecture instantiated on the meta device, and each file key
    is renamed as transformers renames it when loading (`embed_out` is `lm_head` in GPT-NeoX,
    `language_model.model.*` is `model.language_model.*` in Gemma 3's wrapper, ...)."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    out = model.get_output_embeddings()
    params = list(model.named_parameters(remove_duplicate=False))
    names = {"weight": [n for n, p in params if p is out.weight],
             "bias": [n for n, p in params if out.bias is not None and p is out.bias]}
    index = teacher / "model.safetensors.index.json"
    if index.exists():
        where = json.loads(index.read_text())["weight_map"]
    else:
        with safe_open(teacher / "model.safetensors", "pt") as f:
            where = dict.fromkeys(f.keys(), "model.safetensors")
    loaded_as = _loaded_names(model, list(where))
    found = {}
    for part, candidates in names.items():
        for n in candidates:
            key = next((k for k in where if loaded_as.get(k, k) == n), None)
            if key is not None:
                with safe_open(teacher / where[key], "pt") as f:
                    found[part] = f.get_tensor(key)
                break
        else:
            if candidates:
                raise UserError(f"{teacher}: the output head's {part} ({candidates[0]}) is not "
                                "in its safetensors files")
    return found["weight"], found.get("bias")


def _loaded_names(model, keys: list[str]) -> dict[str, str]:
    """{file key: the parameter name transformers loads it as}, by transformers' own renaming
    rules (transformers >= 5; before them, file keys are parameter names)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            rename_source_key,
        )
    except ImportError:
        return {}
    rules = get_model_conversion_mapping(model)
    renames = [r for r in rules if isinstance(r, WeightRenaming)]
    converters = [r for r in rules if isinstance(r, WeightConverter)]
    return {k: rename_source_key(k, renames, converters)[0] for k in keys}
