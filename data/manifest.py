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
from softlabels.data.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    LABEL_STEP,
    READS_VERSIONS,
    TAIL_STEP,
    FormatError,
    tail_draws,
)
from softlabels.data.writer import ShardInfo

MANIFEST = "manifest.json"


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
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
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
        t = dict(self.targets)
        if not self.k:  # no top-k columns: their order and tail describe nothing here
            t.pop("order", None)
            t.pop("missing_mass", None)
        if self.draws and "samples" not in t:
            t["samples"] = (
                f"sample_counts / {self.draws} estimates the teacher's probability of each "
                f"sample id: draws from softmax(logits / {self.sample_temperature:g})" + (
                    " outside the top-k, renormalised (none where the top-k holds all the mass)"
                    if self.tail_draws else ""))
        self.targets = t

    @property
    def tail_draws(self) -> bool:
        """Whether the draws come from outside the top-k (format 3 with both)."""
        return tail_draws(self.format_version, self.k, self.draws)

    @property
    def exact(self) -> bool:
        """Whether the shards store the exact tail mass and the label's log-prob (version 4);
        older datasets give the tail only as 1 - sum(decoded top-k) and no label log-prob."""
        return self.format_version >= 4

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
        if d.get("format_version") not in READS_VERSIONS:
            raise FormatError(
                f"{directory} has format version {d.get('format_version')}, this softlabels "
                f"reads versions {', '.join(map(str, READS_VERSIONS))}: use the matching "
                "release or regenerate it"
            )
        d["shards"] = [ShardInfo(**s) for s in d.get("shards", [])]
        return cls(**d)


def fingerprint_files(paths: list[Path], root: Path | None = None, rehash: bool = False) -> str:
    """sha256 over (relative name, sha256 of content) of files: a content hash of a teacher's
    weights and tokenizer, or of an input corpus.

    Each file's sha256 is cached by (absolute path, size, mtime) in the user's cache folder, so
    a rerun does not read a 15-140 GB teacher again; a file rewritten in place gets a new mtime
    and is hashed anew. `rehash` ignores the cache (`generate --rehash`)."""
    cache = _HashCache.load()
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(str(p.relative_to(root) if root else p.name).encode() + b"\0")
        h.update(cache.sha256(p, rehash).encode() + b"\0")
    cache.save()
    return h.hexdigest()


class _HashCache:
    """{absolute path: [size, mtime_ns, sha256]} in $XDG_CACHE_HOME/softlabels/file-hashes.json."""

    def __init__(self, path: Path, entries: dict):
        self.path, self.entries, self.changed = path, entries, False

    @classmethod
    def load(cls) -> _HashCache:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        path = base / "softlabels" / "file-hashes.json"
        try:
            entries = json.loads(path.read_text())
        except (OSError, ValueError):
            entries = {}
        return cls(path, entries if isinstance(entries, dict) else {})

    def sha256(self, p: Path, rehash: bool) -> str:
        from softlabels.data.writer import sha256_file

        key, st = str(p.resolve()), p.stat()
        hit = self.entries.get(key)
        if not rehash and isinstance(hit, list) and hit[:2] == [st.st_size, st.st_mtime_ns]:
            return hit[2]
        digest = sha256_file(p)
        self.entries[key] = [st.st_size, st.st_mtime_ns, digest]
        self.changed = True
        return digest

    def save(self) -> None:
        if not self.changed:
            return
        # files that are gone (temporary folders, deleted models) leave the cache
        self.entries = {k: v for k, v in self.entries.items() if os.path.exists(k)}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text(self.path, json.dumps(self.entries))
        except OSError:  # a read-only home: the cache is an optimisation, never a failure
            pass
