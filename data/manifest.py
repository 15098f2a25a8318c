"""manifest.json: what a dataset is, where it came from, and which shards belong to it.

Readers trust only the shards the manifest lists; it is written atomically and last, so a
folder with a manifest is a complete dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from softlabels.data.atomic import write_text
from softlabels.data.format import FORMAT_NAME, FORMAT_VERSION, FormatError
from softlabels.data.writer import ShardInfo

MANIFEST = "manifest.json"


@dataclass
class Manifest:
    k: int
    logprob_step: float
    vocab_size: int
    provenance: dict = field(default_factory=dict)
    shards: list[ShardInfo] = field(default_factory=list)
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    # The meaning of the stored numbers, explicit so a reader restates nothing.
    targets: dict = field(
        default_factory=lambda: {
            "values": "natural-log probabilities",
            "temperature": 1.0,
            "normalised_over": "full vocabulary",
            "order": "descending probability",
            "missing_mass": "tail = 1 - sum(exp(topk_logprobs))",
            "alignment": "targets[t] predicts the token after input_ids[0..t]",
        }
    )

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    def save(self, directory: str | os.PathLike) -> None:
        write_text(Path(directory) / MANIFEST, json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Manifest:
        path = Path(directory) / MANIFEST
        if not path.is_file():
            raise FormatError(
                f"{directory} has no {MANIFEST}: not a softlabels dataset, or its generate "
                "run has not finished (rerun the same `softlabels generate` command)"
            )
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise FormatError(f"{path} is not valid JSON ({e}); regenerate the dataset") from e
        if d.get("format") != FORMAT_NAME:
            raise FormatError(f"{path} is not a softlabels manifest")
        if d.get("format_version") != FORMAT_VERSION:
            raise FormatError(
                f"{directory} has format version {d.get('format_version')}, this softlabels "
                f"reads version {FORMAT_VERSION}: use the matching release or regenerate it"
            )
        d["shards"] = [ShardInfo(**s) for s in d.get("shards", [])]
        return cls(**d)


def fingerprint_files(paths: list[Path], root: Path | None = None) -> str:
    """sha256 over (relative name, content) of files: a content hash of weights/tokenizer/input."""
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(str(p.relative_to(root) if root else p.name).encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()
