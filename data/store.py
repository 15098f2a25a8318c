"""Where a dataset lives: a local folder, or a URL fsspec opens (s3://, gs://, hf://, file://).

Readers and `push`/`pull` name a dataset's files through a `Store`: `cat` (whole or a byte range),
`size`, `exists`, `put`/`upload` (whole objects: a store has no rename, so an object appears whole
or not at all). Endpoints and credentials come from where users of those tools keep
them (`AWS_*` including `AWS_ENDPOINT_URL`, `~/.aws`, fsspec's config, `HF_TOKEN`), never from
our flags. A store's failures become one line naming the object (`reaching`).
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from softlabels.data.errors import UserError


def is_url(location) -> bool:
    return isinstance(location, str) and "://" in location


@dataclass
class Store:
    url: str  # as the user wrote it, for messages
    fs: object  # an fsspec filesystem
    root: str  # the dataset's path inside fs

    @property
    def local(self) -> Path | None:
        """The folder, when the store is this machine's disk (where rename is atomic)."""
        return Path(self.root) if "file" in _protocols(self.fs) else None

    def where(self, name: str) -> str:
        return f"{self.url.rstrip('/')}/{name}"

    def _path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def cat(self, name: str, start: int | None = None, end: int | None = None) -> bytes:
        with reaching(self.where(name)):
            return self.fs.cat_file(self._path(name), start=start, end=end)

    def size(self, name: str) -> int:
        with reaching(self.where(name)):
            return int(self.fs.size(self._path(name)))

    def exists(self, name: str) -> bool:
        with reaching(self.where(name)):
            return bool(self.fs.exists(self._path(name)))

    def bucket_missing(self) -> str | None:
        """The bucket (a URL's first part) when it does not exist, else None."""
        if self.url.split("://", 1)[0] not in ("s3", "gs", "gcs"):  # (the Hub has no buckets)
            return None
        bucket = self.root.split("/", 1)[0]
        with reaching(self.url):
            try:
                self.fs.info(bucket)  # (exists() would say False for missing credentials too)
            except FileNotFoundError:
                return bucket
            return None

    def files(self, prefix: str) -> list[str]:
        """Names of the files under `prefix` (one level), relative to the dataset."""
        with reaching(self.where(prefix)):
            if not self.fs.isdir(self._path(prefix)):
                return []
            return sorted(f"{prefix}/{e['name'].rstrip('/').rsplit('/', 1)[-1]}".lstrip("/")
                          for e in self.fs.ls(self._path(prefix), detail=True)
                          if e["type"] == "file")

    def put(self, name: str, data: bytes) -> None:
        """Write one whole object. Locally: temp file + rename, so a reader sees the old file or
        the whole new one."""
        if self.local is not None:
            from softlabels.data.atomic import atomic_path

            with atomic_path(self.local / name) as tmp:
                tmp.write_bytes(data)
            return
        with reaching(self.where(name)):
            self.fs.pipe_file(self._path(name), data)

    def upload(self, name: str, path: Path) -> None:
        """A local file to one whole object (a multipart upload appears only when complete)."""
        if self.local is not None:
            import shutil

            from softlabels.data.atomic import atomic_path

            with atomic_path(self.local / name) as tmp:
                shutil.copyfile(path, tmp)
            return
        with reaching(self.where(name)):
            self.fs.put_file(str(path), self._path(name))

    def create(self, name: str, data: bytes | Path) -> bool:
        """Write `name` only if nothing has that name yet: True if this call wrote it, False if
        it was there (another attempt's, kept as it is). A store's conditional write (S3's
        If-None-Match: *), locally a link of a whole temp file: the write-once commit of an
        attempt that may run twice."""
        if self.local is not None:
            from softlabels.data.atomic import create

            return create(self.local / name, data)
        with reaching(self.where(name)):
            try:
                if isinstance(data, Path):
                    self.fs.put_file(str(data), self._path(name), mode="create")
                else:
                    self.fs.pipe_file(self._path(name), data, mode="create")
            except FileExistsError:
                return False
        return True

    def delete(self, names: list[str]) -> None:
        if names:
            with reaching(self.where(names[0])):
                self.fs.rm([self._path(n) for n in names])

    def download(self, name: str, path: Path) -> None:
        with reaching(self.where(name)):
            self.fs.get_file(self._path(name), str(path))


def store(location) -> Store:
    """The Store of a folder or URL; a URL whose protocol has no installed backend is one line."""
    if isinstance(location, Store):
        return location
    if not is_url(location):
        from fsspec.implementations.local import LocalFileSystem

        return Store(str(location), LocalFileSystem(), os.path.abspath(location))
    import fsspec

    with reaching(location):
        fs, root = fsspec.core.url_to_fs(location)
    return Store(location, fs, root)


def _protocols(fs) -> tuple:
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)


_CREDENTIALS = {"s3": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or ~/.aws/credentials; "
                      "AWS_ENDPOINT_URL for a store other than AWS)",
                "gs": "run `gcloud auth application-default login` or set "
                      "GOOGLE_APPLICATION_CREDENTIALS",
                "hf": "run `hf auth login` or set HF_TOKEN"}


@contextlib.contextmanager
def reaching(where: str):
    """A store's exceptions -> one UserError naming the object and what to do. (Errors of our
    own, and a local file's missing-file error, pass through for the caller to word.)"""
    try:
        yield
    except UserError:
        raise
    except ImportError as e:  # fsspec: "Install s3fs to access S3"
        raise UserError(f"{where}: {' '.join(str(e).split())}") from e
    except FileNotFoundError as e:
        if not is_url(where):
            raise
        why = " ".join(str(e).split())
        raise UserError(f"{where}: not found ({why})") from e
    except PermissionError as e:
        raise UserError(f"{where}: access denied ({' '.join(str(e).split())}); check the "
                        "credentials' permissions on it") from e
    except Exception as e:
        name = type(e).__name__
        if "Credentials" in name or "credentials" in str(e).lower():
            scheme = where.split("://", 1)[0]
            raise UserError(f"{where}: no credentials for {scheme}:// "
                            f"({_CREDENTIALS.get(scheme, 'see the fsspec backend docs')})") from e
        if not is_url(where) and isinstance(e, OSError):
            raise
        why = (" ".join(str(e).split()) or name)[:300]
        raise UserError(f"{where}: the store failed ({name}: {why}); rerun when it answers, "
                        "or raise the retries (fsspec config)") from e


class RangeCache:
    """A bounded local copy of verified byte ranges, named by their sha256 (so a cached range is
    the bytes the manifest hashed, whatever dataset or run asks for it). Oldest first out once the
    folder holds more than `limit` bytes; a second epoch or run reads from here."""

    def __init__(self, directory: str | os.PathLike, limit: int):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.limit = int(limit)
        self.hits = 0
        self._lock = threading.Lock()  # the reader fetches footers from several threads
        self._sizes = {e.name: e.stat().st_size for e in os.scandir(self.dir)
                       if e.is_file() and len(e.name) == 64}
        self._total = sum(self._sizes.values())

    def get(self, digest: str) -> bytes | None:
        import hashlib

        try:
            data = (self.dir / digest).read_bytes()
        except OSError:
            return None
        if hashlib.sha256(data).hexdigest() != digest:  # a damaged cache file: fetch again
            (self.dir / digest).unlink(missing_ok=True)
            with self._lock:
                self._total -= self._sizes.pop(digest, 0)
            return None
        os.utime(self.dir / digest)
        self.hits += 1
        return data

    def put(self, digest: str, data: bytes) -> None:
        if len(data) > self.limit:
            return
        from softlabels.data.atomic import atomic_path

        with atomic_path(self.dir / digest) as tmp:
            tmp.write_bytes(data)
        with self._lock:
            self._evict(digest, len(data))

    def _evict(self, digest: str, n: int) -> None:
        self._total += n - self._sizes.get(digest, 0)
        self._sizes[digest] = n
        if self._total > self.limit:
            by_age = sorted(self._sizes, key=lambda d: _mtime(self.dir / d))
            while self._total > self.limit and by_age:
                old = by_age.pop(0)
                (self.dir / old).unlink(missing_ok=True)
                self._total -= self._sizes.pop(old)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
