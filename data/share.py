"""`softlabels push DIR URL` and `softlabels pull URL DIR`: a finished dataset to a store or the Hub
and back, resumable, checked, manifest last.

A dataset is its manifest's files: the shards, index.parquet, the card (README.md) and
tokenizer/. Both directions copy every file but the manifest, skipping one already there that is
the same (push: a shard of the same size whose footer has the manifest's hash, one ranged read;
a small file of the same bytes; pull: the manifest's sha256), then write the manifest, so a reader
of the destination sees no dataset or a whole one, and a rerun after an interruption copies only
what is missing. Nothing else of the folder (.softlabels/, temp files) travels.
"""

from __future__ import annotations

import hashlib

from softlabels.data.atomic import atomic_path
from softlabels.data.dataset import CARD, MANIFEST, TOKENIZER_DIR, sha256_file
from softlabels.data.errors import UserError
from softlabels.data.manifest import Manifest
from softlabels.data.store import Store, store


def _files(st: Store, m: Manifest) -> list[str]:
    """The files a dataset publishes, shards first, manifest not included."""
    index = [m.index["file"]] if m.index is not None else []
    extra = [CARD] if st.exists(CARD) else []
    return [s.file for s in m.shards] + index + extra + st.files(TOKENIZER_DIR)


def push(src, url, log=print) -> int:
    """Copy the local dataset `src` to `url`. It is verified first: a store is where others read
    it from, so a damaged shard is found here, not by them. Returns the files copied."""
    from softlabels.data.verify import verify

    a, b = store(src), store(url)
    if a.local is None:
        raise UserError(f"push copies a local dataset folder; {src} is a URL (pull it first)")
    problems = verify(src)
    if problems:
        raise UserError(f"{src} fails verify ({problems[0]}; {len(problems)} problem(s)): "
                        "`softlabels verify` lists them; push only an intact dataset")
    m = Manifest.load(a)
    manifest = a.cat(MANIFEST)
    if b.exists(MANIFEST):
        if b.cat(MANIFEST) == manifest:
            log(f"{url}: already holds this dataset")
            return 0
        raise UserError(f"{url} holds another dataset (its manifest.json differs); push to a new "
                        "URL, or delete that one first")
    shards = {s.file: s for s in m.shards}
    copied = 0
    for name in _files(a, m):
        size = (a.local / name).stat().st_size
        if b.exists(name) and b.size(name) == size and _same(a, b, name, shards.get(name)):
            continue  # an earlier push got this far
        b.upload(name, a.local / name)
        if b.size(name) != size:
            raise UserError(f"{b.where(name)}: {b.size(name)} bytes arrived of {size}; rerun "
                            "the same push")
        copied += 1
        log(f"pushed {name} ({size} bytes)")
    b.put(MANIFEST, manifest)  # last: the destination is a dataset from here on
    log(f"{url}: {len(m.shards)} shards, {m.rows} rows, {m.tokens} tokens ({copied} files "
        "copied, manifest last)")
    return copied


def _same(a: Store, b: Store, name: str, shard) -> bool:
    """The object at the destination is the local file (its size already equal)."""
    if shard is not None and shard.footer is not None:
        off, n, digest = shard.footer
        return hashlib.sha256(b.cat(name, off, off + n)).hexdigest() == digest
    return b.cat(name) == (a.local / name).read_bytes()  # small files, or old shards


def pull(url, dst, log=print) -> int:
    """Copy the dataset at `url` into the folder `dst`, each shard checked against the manifest's
    sha256 before it is renamed into place. Returns the files copied."""
    a, b = store(url), store(dst)
    if b.local is None:
        raise UserError(f"pull copies into a local folder; {dst} is a URL")
    m = Manifest.load(a)  # (checked: a manifest this package cannot read is refused here)
    manifest = a.cat(MANIFEST)
    out = b.local
    if (out / MANIFEST).is_file():
        if (out / MANIFEST).read_bytes() == manifest:
            log(f"{dst}: already holds this dataset")
            return 0
        raise UserError(f"{dst} holds another dataset (its manifest.json differs); pull into a "
                        "new folder")
    hashes = {s.file: s.sha256 for s in m.shards}
    if m.index is not None:
        hashes[m.index["file"]] = m.index["sha256"]
    copied = 0
    for name in _files(a, m):
        want = hashes.get(name)
        have = out / name
        if want is not None and have.is_file() and sha256_file(have) == want:
            continue  # an earlier pull got this far
        with atomic_path(have) as tmp:
            a.download(name, tmp)
            if want is not None and sha256_file(tmp) != want:
                raise UserError(f"{a.where(name)}: sha256 differs from its manifest.json (changed "
                                "or damaged after publishing); the publisher must regenerate it")
            size = tmp.stat().st_size
        copied += 1
        log(f"pulled {name} ({size} bytes)")
    b.put(MANIFEST, manifest)
    log(f"{dst}: {len(m.shards)} shards, {m.rows} rows, {m.tokens} tokens ({copied} files "
        "copied, manifest last)")
    return copied

