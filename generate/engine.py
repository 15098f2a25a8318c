"""The teacher: one vLLM engine per worker, and what it returns turned into targets.

Scoring (`Teacher`): vLLM's pooling runner returns the final hidden state of every position of a
window of T tokens; the teacher's output head (head.py) makes them T target positions, aligned as
the format says: targets[t] predicts the token after input_ids[0..t].

Responses (`Responder`, --generate-responses): vLLM's generate runner samples them, and each step's
top-k come back with flat_logprobs (k+1 entries: the sampled token, then the top-k in rank order).
A response model (--response-model) is a Responder with k = 0: only its sampled tokens and their
log-probs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from softlabels.data.format import log1mexp


@dataclass(frozen=True)
class EngineConfig:
    """What builds a teacher engine. `extra` passes any other vllm.LLM keyword (JSON values)."""

    teacher: str
    k: int
    max_length: int
    dtype: str = "auto"  # "auto": float32 on CPU (bf16 is ~6x slower without AVX512), else model's
    tensor_parallel_size: int = 1
    max_num_batched_tokens: int | None = None
    kv_cache_gib: int = 2  # VLLM_CPU_KVCACHE_SPACE (whole GiB); ignored on GPUs
    seed: int = 0  # with draws: window (seed, row id) draws its own uniforms
    draws: int = 0  # --samples: draws per position from the teacher's distribution
    sample_temperature: float = 1.0
    extra: tuple[tuple[str, object], ...] = field(default_factory=tuple)
    trust_remote_code: bool = False  # the teacher folder's own Python runs only when asked


@dataclass(frozen=True)
class Sampling:
    """How the teacher writes responses (--generate-responses)."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    seed: int = 0  # request i uses seed + its record index: reproducible in any batching


def on_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


class EngineMismatch(RuntimeError):
    """vLLM returned results that do not answer the prompts sent (stale queued requests)."""


def check_answers(prompts: list[list[int]], outs) -> None:
    """Each result must answer the prompt it is paired with, token for token: results are
    paired with windows by position, and a stale request left in an engine would shift them."""
    if len(outs) != len(prompts):
        raise EngineMismatch(f"the engine returned {len(outs)} results for {len(prompts)} "
                             "prompts")
    for i, (p, o) in enumerate(zip(prompts, outs)):
        if list(o.prompt_token_ids) != list(p):
            raise EngineMismatch(f"result {i} answers another prompt (request {o.request_id})")


def _build(cfg: EngineConfig, **kw):
    """A vLLM engine for `cfg`; `kw` picks the runner (pooling for scoring, generate for
    responses)."""
    if on_cpu():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.kv_cache_gib))
    from vllm import LLM

    return LLM(
        model=cfg.teacher,
        dtype=engine_dtype(cfg),
        tensor_parallel_size=cfg.tensor_parallel_size,
        max_model_len=cfg.max_length + 1,
        max_num_batched_tokens=cfg.max_num_batched_tokens or max(8192, cfg.max_length + 1),
        enable_prefix_caching=False,
        enforce_eager=on_cpu(),
        seed=cfg.seed,
        trust_remote_code=cfg.trust_remote_code,
        # never unpickle weights, unless the user names another format (--engine-arg)
        **{"load_format": "safetensors", **kw, **dict(cfg.extra)},
    )


def engine_dtype(cfg: EngineConfig) -> str:
    return "float32" if cfg.dtype == "auto" and on_cpu() else cfg.dtype


class Teacher:
    """Scores windows: vLLM's pooling runner returns every position's final hidden state, and
    softlabels' copy of the teacher's output head (head.Head) turns them into targets.

    Measured against vLLM's own prompt logprobs in the same run (bench/route.py): as exact, and
    faster, since nothing per position passes through Python objects; so it is the only route."""

    GROUP_TOKENS = 16384  # windows per encode call: bounds the hidden states held at once

    def __init__(self, cfg: EngineConfig):
        from vllm.config import PoolerConfig

        from softlabels.generate.head import Head

        self.cfg = cfg
        self.llm = _build(cfg, runner="pooling", convert="embed", pooler_config=PoolerConfig(
            task="token_embed", tok_pooling_type="ALL", use_activation=False))
        dtype = self.llm.llm_engine.model_config.dtype
        self.head = Head(cfg.teacher, dtype, "cpu" if on_cpu() else "cuda",
                         cfg.trust_remote_code)

    def hidden(self, windows: list[list[int]]):
        """Per window of T tokens, its (T, hidden) final hidden states, a group at a time."""
        from vllm.inputs import TokensPrompt

        group, tokens = [], 0
        for w in windows + [None]:
            if group and (w is None or tokens + len(w) > self.GROUP_TOKENS):
                outs = self.llm.encode([TokensPrompt(prompt_token_ids=g) for g in group],
                                       pooling_task="token_embed", use_tqdm=False)
                check_answers(group, outs)
                yield from (o.outputs.data for o in outs)
                group, tokens = [], 0
            if w is not None:
                group.append(w)
                tokens += len(w)

    def outputs(self, windows: list[list[int]], row_ids: list[str]) -> list:
        """Per window: head.TeacherOutput (top-k in rank order, the exact tail, the log-prob of each
        next token within the window; draws when cfg.draws)."""
        from softlabels.generate.head import window_seed

        c = self.cfg
        return [self.head.outputs(h, c.k, np.append(w[1:], -1), c.draws, c.sample_temperature,
                                  window_seed(c.seed, rid) if c.draws else None)
                for h, w, rid in zip(self.hidden(windows), windows, row_ids)]


class Responder:
    """Writes responses (--generate-responses) with vLLM's generate runner; the top-k of each
    sampled step come back with it."""

    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        self.llm = _build(cfg, max_logprobs=max(cfg.k, 1), skip_tokenizer_init=True)

    def respond(self, prompts: list[list[int]], records: list[int], s: Sampling):
        """Sample responses; per prompt, n of (response ids, (R, k) ids, (R, k) logprobs, (R,)
        log of the mass outside the top-k, (R,) log-prob of each sampled token).

        The logprobs of each sampled step are the teacher's raw distribution (temperature 1,
        before top-p) that predicted that response token: one pass gives text and targets. vLLM
        returns the top-k's float32 log-probs, not their complement, so the tail is 1 - their
        sum in float64: exact to ~1e-6 absolute (the scoring route sums it from the logits).
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        k, room = self.cfg.k, self.cfg.max_length
        params = [
            SamplingParams(max_tokens=min(s.max_new_tokens, room - len(p)), n=s.n,
                           temperature=s.temperature, top_p=s.top_p, seed=s.seed + r,
                           logprobs=k, detokenize=False, flat_logprobs=True)
            for p, r in zip(prompts, records)
        ]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                                 use_tqdm=False)
        check_answers(prompts, outs)
        result = []
        for o in outs:
            samples = []
            for c in sorted(o.outputs, key=lambda c: c.index):
                R = len(c.token_ids)
                lp = c.logprobs
                starts = np.asarray(lp.start_indices)
                ids = np.asarray(lp.token_ids, np.int32)
                vals = np.asarray(lp.logprobs, np.float32)
                # each step lists the sampled token, then the top-k: keep the last k entries
                take = (np.asarray(lp.end_indices)[:, None] - k + np.arange(k)[None, :])
                assert len(starts) == R
                top = vals[take].astype(np.float64)
                tail = log1mexp(np.minimum(np.logaddexp.reduce(top, -1), 0.0))
                samples.append((list(c.token_ids), ids[take], vals[take],
                                tail.astype(np.float32), vals[starts]))
            result.append(samples)
        return result
