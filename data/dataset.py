"""A dataset folder's layout, its tokenizer, and the hashes that tie its files to the manifest.

    DIR/manifest.json   what the dataset is and which shards belong to it (written last)
    DIR/README.md       the card: Hub front matter and provenance (card.py)
    DIR/tokenizer/      the teacher's tokenizer, so inspect and train can decode and check ids
    DIR/shard-*.parquet the shards the manifest lists (shard.py)
    DIR/index.parquet   every row's shard, row group and counts: one object to plan from (counts.py)

DIR is a folder or a URL (store.py). Each shard is hashed whole (`sha256`) and by the byte ranges
a streaming reader fetches (`footer`, `row_groups`: data/FORMAT.md, "Hashes"), so a student that
reads a few row groups of a remote shard checks every byte it uses without reading the rest.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

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
    # [offset, length, sha256] of the file's tail (Parquet footer, its length, "PAR1") and of
    # each row group's column chunks; None in datasets written before them (read whole instead)
    footer: list | None = None
    row_groups: list | None = None


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def footer_span(size: int, tail: bytes) -> tuple[int, int]:
    """(offset, length) of a Parquet file's footer range from its last 8 bytes."""
    if len(tail) != 8 or tail[4:] != b"PAR1":
        raise ValueError("not a Parquet file (no PAR1 at its end)")
    n = int.from_bytes(tail[:4], "little") + 8
    if n > size - 4:
        raise ValueError(f"footer length {n} does not fit a {size}-byte file")
    return size - n, n


def group_spans(md: pq.FileMetaData) -> list[tuple[int, int]]:
    """(offset, length) of each row group: its first column chunk's first page (dictionary or
    data) to the end of its last column chunk, as the file's metadata places them."""
    spans = []
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        chunks = [rg.column(c) for c in range(rg.num_columns)]
        starts = [c.dictionary_page_offset if c.has_dictionary_page else c.data_page_offset
                  for c in chunks]
        a = min(starts)
        spans.append((a, max(s + c.total_compressed_size for s, c in zip(starts, chunks)) - a))
    return spans


def hashes(path: str | os.PathLike) -> dict:
    """A shard file's manifest hashes: sha256, bytes, footer, row_groups."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(size - 8)
        foot = footer_span(size, f.read(8))
        spans = [*group_spans(pq.read_metadata(path)), foot]
        whole, pos, out = hashlib.sha256(), 0, []
        f.seek(0)
        for off, n in spans:  # one pass: the file's hash and each range's (ascending, disjoint)
            if off < pos:
                raise ValueError(f"byte ranges overlap at {off}")
            whole.update(f.read(off - pos))
            part, left = hashlib.sha256(), n
            while left:
                block = f.read(min(left, 1 << 20))
                if not block:
                    raise ValueError(f"the file ends inside bytes {off}..{off + n}")
                part.update(block)
                whole.update(block)
                left -= len(block)
            out.append([off, n, part.hexdigest()])
            pos = off + n
        whole.update(f.read())
    return {"sha256": whole.hexdigest(), "bytes": size, "footer": out[-1],
            "row_groups": out[:-1]}


_FETCHED: dict[str, Path] = {}  # a store's tokenizer/, copied once per process


def load_tokenizer(directory):
    """The dataset's tokenizer, or None if it carries none; it never runs code from the folder.
    A store's tokenizer/ (a few small files) is copied to a temp folder first, once a process."""
    from softlabels.data.store import store

    st = store(directory)
    path = st.local / TOKENIZER_DIR if st.local is not None else _FETCHED.get(st.url)
    if path is None:
        names = st.files(TOKENIZER_DIR)
        if not names:
            return None
        path = Path(tempfile.mkdtemp(prefix="softlabels-tokenizer-"))
        atexit.register(shutil.rmtree, path, True)
        for name in names:
            (path / Path(name).name).write_bytes(st.cat(name))
        _FETCHED[st.url] = path
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
