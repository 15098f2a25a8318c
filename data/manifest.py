"""manifest.json: what a dataset is, where it came from, and which shards belong to it.

Readers trust only the shards the manifest lists; it is written atomically and last, so a
folder with a manifest is a complete dataset.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from softlabels.data.atomic import write_text
from softlabels.data.dataset import MANIFEST, ShardInfo
from softlabels.data.format import (
    FLAGS,
    FORMAT_NAME,
    FORMAT_VERSION,
    LABEL_STEP,
    READS_VERSIONS,
    TAIL_STEP,
    Encoding,
    FormatError,
    implied_flags,
)


@dataclass
class Manifest:
    k: int
    logprob_step: float
    vocab_size: int
    draws: int = 0  # sampled targets per position (generate --samples); 0: none
    sample_temperature: float = 1.0
    tail_step: float = TAIL_STEP  # version 4: quantisation of the tail and label columns
    label_step: float = LABEL_STEP
    provenance: dict = field(default_factory=dict)
    shards: list[ShardInfo] = field(default_factory=list)
    # {"file": "index.parquet", "sha256", "bytes"}: every row's shard, row group and counts, so a
    # reader plans from one object; None in datasets written before it (planned from the footers)
    index: dict | None = None
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    # Version 5: what the tail and label columns hold (None: what the version implies; a dataset
    # imported from another tool states what its source lacks). Encoding has the rules.
    exact_tail: bool | None = None
    label_logprobs: bool | None = None
    topk_renormalised: bool | None = None
    # The meaning of the stored numbers, explicit so a reader restates nothing.
    targets: dict = field(
        default_factory=lambda: {
            "values": "natural-log probabilities",
            "temperature": 1.0,
            "normalised_over": "full vocabulary",
            "order": "descending probability",
            "missing_mass": f"tail = exp(-{TAIL_STEP!r} * q) if q = tail_mass_q < 32768, "
                            f"else 1 - exp(-{TAIL_STEP!r} * (q - 32768)); exact (from the "
                            "unquantised logits)",
            "label_logprob": f"-{LABEL_STEP!r} * label_logprob_q: the teacher's log-prob of "
                             "input_ids[t+1], exact; none where the mask is false or at a "
                             "row's last position",
            "alignment": "targets[t] predicts the token after input_ids[0..t]",
        }
    )

    def __post_init__(self):
        for name, default in zip(FLAGS, implied_flags(self.format_version)):
            if getattr(self, name) is None:
                setattr(self, name, default)
        t = dict(self.targets)
        if not self.k:  # no top-k columns: their order and tail describe nothing here
            t.pop("order", None)
            t.pop("missing_mass", None)
        elif self.topk_renormalised:
            t["normalised_over"] = f"the {self.k} stored ids (renormalised by the source)"
            t["missing_mass"] = "unknown: the source stored the top-k renormalised (tail 0)"
        elif not self.exact_tail and self.format_version >= 4:
            t["missing_mass"] = ("1 - the sum of the source's unrounded top-k (not exact: "
                                 "tail_mass_q codes it as for an exact tail)")
        if not self.label_logprobs:
            t.pop("label_logprob", None)
        if self.draws and "samples" not in t:
            t["samples"] = (
                f"sample_counts / {self.draws} estimates the teacher's probability of each "
                f"sample id: draws from softmax(logits / {self.sample_temperature:g})" + (
                    " outside the top-k, renormalised (none where the top-k holds all the mass)"
                    if self.tail_draws else ""))
        self.targets = t

    @property
    def encoding(self) -> Encoding:
        """The encoding every shard's schema must state (its fields are this manifest's)."""
        return Encoding(self.k, self.logprob_step, self.draws, self.sample_temperature,
                        self.format_version, self.tail_step, self.label_step, self.exact_tail,
                        self.label_logprobs, self.topk_renormalised)

    @property
    def tail_draws(self) -> bool:
        """Whether the draws come from outside the top-k (format 3 with both)."""
        return self.encoding.tail_draws

    @property
    def exact(self) -> bool:
        """Whether the shards store the exact tail mass and the label's log-prob (version 4 on);
        older datasets give the tail only as 1 - sum(decoded top-k) and no label log-prob, and
        imported ones state what their source lacked (`exact_tail`, `label_logprobs`)."""
        return self.encoding.exact

    @property
    def what(self) -> str:
        """What this dataset is, for messages about what it lacks: "format 3", "imported from
        distillkit"."""
        src = self.provenance.get("imported_from") if isinstance(self.provenance, dict) else None
        return f"imported from {src}" if src else f"format {self.format_version}"

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    def save(self, directory: str | os.PathLike) -> None:
        write_text(Path(directory) / MANIFEST, json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, directory) -> Manifest:
        """The manifest of a folder or URL (store.py)."""
        from softlabels.data.store import store

        st = store(directory)
        path = st.where(MANIFEST)
        if not st.exists(MANIFEST):
            if bucket := st.bucket_missing():
                raise FormatError(f"{st.url}: bucket {bucket!r} does not exist (or these "
                                  "credentials cannot see it)")
            raise FormatError(
                f"{st.url} has no {MANIFEST}: not a softlabels dataset, or its generate "
                "run has not finished (rerun the same `softlabels generate` command)"
            )
        try:
            d = json.loads(st.cat(MANIFEST).decode())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FormatError(f"{path} is not valid JSON ({e}); regenerate the dataset") from e
        if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
            raise FormatError(f"{path} is not a softlabels manifest")
        if d.get("format_version") not in READS_VERSIONS:
            raise FormatError(
                f"{directory} has format version {d.get('format_version')}, this softlabels "
                f"reads versions {', '.join(map(str, READS_VERSIONS))}: use the matching "
                "release or regenerate it"
            )
        d = _typed(d, path)
        m = cls(**d)
        try:
            enc = m.encoding  # its numbers in the range the writer produces
        except FormatError as e:
            raise FormatError(f"{path}: {e}") from None
        if not enc.k <= m.vocab_size:
            raise FormatError(f"{path}: k {m.k} is larger than vocab_size {m.vocab_size}")
        return m


_TYPES = {"k": int, "logprob_step": float, "vocab_size": int, "draws": int,
          "sample_temperature": float, "tail_step": float, "label_step": float,
          "provenance": dict, "shards": list, "index": (dict, type(None)), "format": str,
          "format_version": int, "exact_tail": bool, "label_logprobs": bool,
          "topk_renormalised": bool,
          "targets": dict}
_SHARD_TYPES = {"file": str, "rows": int, "tokens": int, "sha256": str, "bytes": int,
                "footer": (list, type(None)), "row_groups": (list, type(None))}
_SHARD_REQUIRED = ("file", "rows", "tokens", "sha256", "bytes")
_REQUIRED = ("k", "logprob_step", "vocab_size")


def _typed(d, path) -> dict:
    """The manifest's keys as the dataclass expects them, or one FormatError naming the first
    key that is unknown, missing or of the wrong type (a JSON number where a count goes must be
    an integer; booleans are not numbers)."""
    def ok(v, t) -> bool:
        if isinstance(t, tuple):
            return any(ok(v, u) for u in t)
        if t is float:
            return isinstance(v, (int, float)) and not isinstance(v, bool)
        return isinstance(v, t) and not (t is int and isinstance(v, bool))

    def check(obj: dict, types: dict, required, where: str) -> None:
        if not isinstance(obj, dict):
            raise FormatError(f"{path}: {where} is not a JSON object")
        for key in obj:
            if key not in types:
                raise FormatError(f"{path}: unknown key {where}{key!r} (this softlabels knows "
                                  f"{', '.join(types)}); a damaged or hand-edited manifest")
        for key in required:
            if key not in obj:
                raise FormatError(f"{path}: {where}{key!r} is missing")
        for key, v in obj.items():
            if not ok(v, types[key]):
                want = types[key][0] if isinstance(types[key], tuple) else types[key]
                raise FormatError(f"{path}: {where}{key!r} is {v!r}, expected a JSON "
                                  f"{want.__name__}")

    check(d, _TYPES, _REQUIRED + FLAGS * (d.get("format_version") >= 5), "")
    if not 1 <= d["vocab_size"] < 1 << 31:  # (k and draws: the Encoding's own range check)
        raise FormatError(f"{path}: vocab_size {d['vocab_size']} is out of range")
    index = d.get("index")
    if index is not None and not (
            set(index) == {"file", "sha256", "bytes"} and index["file"] == "index.parquet"
            and isinstance(index["sha256"], str) and len(index["sha256"]) == 64
            and isinstance(index["bytes"], int) and not isinstance(index["bytes"], bool)
            and 0 < index["bytes"] < 1 << 53):
        raise FormatError(f"{path}: index {index!r} is not {{file: index.parquet, sha256, "
                          "bytes}")
    shards = []
    for i, s in enumerate(d.get("shards", [])):
        check(s, _SHARD_TYPES, _SHARD_REQUIRED, f"shards[{i}].")
        name = s["file"]  # a manifest names files of its own folder, never others
        if not name or name != Path(name).name or name in (".", ".."):
            raise FormatError(f"{path} lists shard {name!r}, which is not a file of the "
                              "dataset's own folder; a dataset names only its own files")
        if not all(0 <= s[c] < 1 << 53 for c in ("rows", "tokens", "bytes")):
            raise FormatError(f"{path}: shards[{i}] has a count out of range")
        _spans(s, f"{path}: shards[{i}]")
        shards.append(ShardInfo(**s))
    return {**d, "shards": shards}


def _spans(s: dict, where: str) -> None:
    """`footer` and `row_groups` are [offset, length, sha256] inside the file, the footer its
    tail: a reader fetches exactly these bytes, so they must be possible."""
    spans = ([s["footer"]] if s.get("footer") is not None else []) + (s.get("row_groups") or [])
    for span in spans:
        if not (isinstance(span, list) and len(span) == 3
                and all(isinstance(x, int) and not isinstance(x, bool) for x in span[:2])
                and isinstance(span[2], str) and len(span[2]) == 64
                and 0 <= span[0] and 0 < span[1] and span[0] + span[1] <= s["bytes"]):
            raise FormatError(f"{where} has a byte range {span!r} that is not [offset, length, "
                              f"sha256] inside its {s['bytes']}-byte file")
    if s.get("footer") is not None and sum(s["footer"][:2]) != s["bytes"]:
        raise FormatError(f"{where}: its footer range does not end the file")
    if (s.get("footer") is None) != (s.get("row_groups") is None):
        raise FormatError(f"{where} has footer and row_groups hashes only in part")
