"""A dataset folder's layout, its tokenizer, and the hashes that tie its files to the manifest.

    DIR/manifest.json   what the dataset is and which shards belong to it (written last)
    DIR/README.md       the card: Hub front matter and provenance (card.py)
    DIR/tokenizer/      the teacher's tokenizer, so inspect and train can decode and check ids
    DIR/shard-*.parquet the shards the manifest lists (shard.py); nothing else is read
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "manifest.json"
CARD = "README.md"
TOKENIZER_DIR = "tokenizer"


@dataclass
class ShardInfo:
    """What the manifest records of a committed shard."""

    file: str
    rows: int
    tokens: int
    sha256: str
    bytes: int


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_tokenizer(directory: str | os.PathLike):
    """The dataset's tokenizer, or None if it carries none; it never runs code from the folder."""
    path = Path(directory) / TOKENIZER_DIR
    if not path.is_dir():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=False)


def save_tokenizer(tok, directory: str | os.PathLike) -> None:
    """The dataset carries its tokenizer: saved beside, then renamed into place."""
    out = Path(directory)
    tmp = out / f".{TOKENIZER_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(tmp)
    shutil.rmtree(out / TOKENIZER_DIR, ignore_errors=True)
    os.replace(tmp, out / TOKENIZER_DIR)
