"""The teacher: one vLLM engine, asked for the top-k next-token log-probs at every position.

vLLM's prompt logprobs give, for prompt position i >= 1, the distribution that predicted token i;
one generated step (max_tokens=1, logprobs=k) gives the distribution after the last token. So a
window of T tokens gets T target positions, aligned as the format says: targets[t] predicts the
token after input_ids[0..t].

With flat_logprobs each position holds k+1 entries: entry 0 is the actual token (prompt) or the
sampled one (generated step), entries 1..k the top-k in rank order, so one reshape does it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np


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
    seed: int = 0
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


class Teacher:
    """A vLLM engine built once per process and reused for every work unit."""

    def __init__(self, cfg: EngineConfig):
        if on_cpu():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.kv_cache_gib))
        from vllm import LLM, SamplingParams

        dtype = cfg.dtype
        if dtype == "auto" and on_cpu():
            dtype = "float32"
        batched = cfg.max_num_batched_tokens or max(8192, cfg.max_length + 1)
        self.cfg = cfg
        self.llm = LLM(
            model=cfg.teacher,
            dtype=dtype,
            tensor_parallel_size=cfg.tensor_parallel_size,
            max_model_len=cfg.max_length + 1,
            max_num_batched_tokens=batched,
            max_logprobs=cfg.k,
            skip_tokenizer_init=True,
            enable_prefix_caching=False,
            enforce_eager=on_cpu(),
            seed=cfg.seed,
            trust_remote_code=cfg.trust_remote_code,
            # never unpickle weights, unless the user names another format (--engine-arg)
            **{"load_format": "safetensors", **dict(cfg.extra)},
        )
        self.params = SamplingParams(
            max_tokens=1,
            temperature=0.0,
            prompt_logprobs=cfg.k,
            logprobs=cfg.k,
            detokenize=False,
            flat_logprobs=True,
        )

    def topk(self, windows: list[list[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per window of T tokens: (T, k) int32 ids and (T, k) float32 logprobs, rank order."""
        from vllm.inputs import TokensPrompt

        k = self.cfg.k
        prompts = [TokensPrompt(prompt_token_ids=w) for w in windows]
        outs = self.llm.generate(prompts, self.params, use_tqdm=False)
        check_answers(windows, outs)
        result = []
        for w, o in zip(windows, outs):
            T = len(w)
            ids = np.empty((T, k), np.int32)
            lps = np.empty((T, k), np.float32)
            if T > 1:
                # Position 0 of prompt_logprobs is empty; position i predicted token i.
                pl = o.prompt_logprobs
                ids[:-1] = np.asarray(pl.token_ids, np.int32).reshape(T - 1, k + 1)[:, 1:]
                lps[:-1] = np.asarray(pl.logprobs, np.float32).reshape(T - 1, k + 1)[:, 1:]
            last = o.outputs[0].logprobs
            n = len(last.token_ids)  # k+1, or k when the sampled token is itself counted once
            ids[-1] = np.asarray(last.token_ids, np.int32)[n - k :]
            lps[-1] = np.asarray(last.logprobs, np.float32)[n - k :]
            result.append((ids, lps))
        return result

    def respond(self, prompts: list[list[int]], records: list[int], s: Sampling):
        """Sample responses; per prompt, n of (response ids, (R, k) ids, (R, k) logprobs).

        The logprobs of each sampled step are the teacher's raw distribution (temperature 1,
        before top-p) that predicted that response token: one pass gives text and targets.
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
                samples.append((list(c.token_ids), ids[take], vals[take]))
            result.append(samples)
        return result
