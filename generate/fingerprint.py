"""Content hashes of a teacher folder or an input corpus, cached so a rerun reads neither again.

These name the job (plan.Job): a changed teacher or input is a different job.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from softlabels.data.atomic import write_text
from softlabels.data.dataset import sha256_file


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
