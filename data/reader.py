"""Streaming reader: rows of a soft-label dataset, a few row groups in memory at a time.

An epoch's row order is planned from the dataset's index.parquet alone (`index`; from the shards'
footers for datasets without one): which shard, row group and row each global position is, and its
token and target counts (stored at commit; counted from two cheap columns for older shards). So a
trainer knows every epoch's batches and step counts before decoding anything, and each process
decodes only the rows it trains on (`read`).

Order is deterministic: the manifest's shards in order, each shard's row groups in order, rows in
order. With `shuffle`, row groups are visited in a seeded random order, and the rows of each run
of `window` consecutive (shuffled) groups are shuffled together: a batch mixes rows of several
shards, while memory holds at most `window` row groups. `part`/`num_parts` (for `rows`) keep every
num_parts-th row of the global order, so N readers together see every row exactly once.

The dataset is a folder or a URL (store.py), read the same way: a shard's footer and each row
group are fetched as the byte ranges the manifest hashes, and each is checked against its sha256
before pyarrow parses it, so a student on a remote dataset reads only the row groups it trains on
and uses no byte it has not checked. (A dataset written before the range hashes is checked by each
shard's whole sha256 the first time it is opened; from a store, that downloads the shard.)

What the reader hands out has also passed the checks `softlabels verify` makes: every row group's
values (checks.py, vectorised) and each row's length against its footer count. A dataset whose
publisher controls the manifest can make hashes agree, hence the value checks.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from softlabels.data.checks import problems
from softlabels.data.counts import INDEX, count_rows, footer_rows, read_index
from softlabels.data.dataset import group_spans, sha256_file
from softlabels.data.format import Encoding, FormatError, Row, decode, flatten, one_batch
from softlabels.data.manifest import Manifest
from softlabels.data.store import RangeCache, store

SHUFFLE_WINDOW = 8  # row groups shuffled together (~32k tokens each)
FOOTER_READS = 16  # footers fetched at once when planning (a store's round trips overlap)
FETCHES = 3  # tries of a range whose bytes came back short or changed


@dataclass
class RowIndex:
    """Every row of one epoch, in that epoch's order: where it is stored and what it counts."""

    shard: np.ndarray  # (R,) shard index in the manifest
    group: np.ndarray  # (R,) row group within the shard
    local: np.ndarray  # (R,) row within the row group
    tokens: np.ndarray  # (R,) tokens
    kd_positions: np.ndarray  # (R,) positions with a target (KD)
    ce_positions: np.ndarray  # (R,) positions with a target and a known next token (CE)

    def take(self, order: np.ndarray) -> RowIndex:
        return RowIndex(*(a[order] for a in vars(self).values()))


@contextlib.contextmanager
def damaged(path):
    """pyarrow's (and numpy's) errors on a shard that is not what its manifest says -> one
    FormatError naming the file: a truncated or altered file, even one whose hash the
    publisher fixed, is bad input, not a crash."""
    try:
        yield
    except FormatError:
        raise
    except FileNotFoundError as e:
        raise FormatError(f"{path}: missing; `softlabels verify` lists every problem") from e
    except (pa.ArrowException, OSError, ValueError, IndexError, KeyError, TypeError) as e:
        why = (str(e).splitlines() or [""])[0]
        raise FormatError(f"{path}: unreadable ({type(e).__name__}: {why}); the file is "
                          "damaged: regenerate or re-download the dataset") from e


class SoftLabelReader:
    def __init__(
        self,
        directory,
        shuffle: bool = False,
        seed: int = 0,
        part: int = 0,
        num_parts: int = 1,
        window: int = SHUFFLE_WINDOW,
        cache: RangeCache | None = None,
    ):
        if not 0 <= part < num_parts:
            raise ValueError(f"part {part} not in [0, {num_parts})")
        self.store = store(directory)
        self.dir = directory  # as given: a folder or a URL, for messages
        self.manifest = Manifest.load(self.store)
        self.shuffle, self.seed, self.part, self.num_parts = shuffle, seed, part, num_parts
        self.window = max(1, window)
        self.cache = cache if self.store.local is None else None  # a disk needs no copy
        self.decoded = 0  # rows decoded by this reader (each process decodes only its own)
        self.fetched = 0  # bytes read from the store (not the cache)
        self._lock = threading.Lock()
        self._meta: dict[int, pq.FileMetaData] = {}  # footers, checked
        self._encodings: dict[int, Encoding] = {}  # shards whose encoding was checked
        self._whole: dict[int, pq.ParquetFile] = {}  # the open shard of an unhashed dataset
        self._tmp: tempfile.TemporaryDirectory | None = None  # where a store's such shard lands
        self._stored: RowIndex | None = None  # every row in stored order, from the footers
        self._groups: dict[int, list[int]] = {}  # each shard's row group sizes, from the index
        self._epoch: tuple[int, RowIndex] | None = None
        self._tables: OrderedDict[tuple[int, int], pa.Table] = OrderedDict()  # undecoded groups

    def __len__(self) -> int:
        """Rows this part yields per epoch."""
        n = self.manifest.rows
        return n // self.num_parts + (1 if self.part < n % self.num_parts else 0)

    def where(self, si: int) -> str:
        return self.store.where(self.manifest.shards[si].file)

    # ------------------------------------------------------------------ checked bytes

    def _fetch(self, si: int, span: list) -> bytes:
        return self._checked_bytes(self.manifest.shards[si].file, *span)

    def _checked_bytes(self, name: str, off: int, n: int, digest: str) -> bytes:
        """The bytes of one hashed range, checked against the manifest before anyone parses
        them; a short or changed read is fetched again (a cut connection), then refused."""
        if self.cache is not None and (data := self.cache.get(digest)) is not None:
            return data
        tries = 1 if self.store.local is not None else FETCHES  # a disk read is not a network
        for attempt in range(tries):
            if attempt:
                time.sleep(0.2 * 2 ** attempt)
            data = self.store.cat(name, off, off + n)
            with self._lock:  # (footers and row groups are fetched from several threads)
                self.fetched += len(data)
            if len(data) == n and hashlib.sha256(data).hexdigest() == digest:
                if self.cache is not None:
                    self.cache.put(digest, data)
                return data
        raise FormatError(f"{self.store.where(name)}: sha256 differs from manifest.json for bytes "
                          f"{off}..{off + n} (changed or damaged after publishing); `softlabels "
                          "verify` lists every problem: regenerate or re-download the dataset")

    def _footer(self, si: int) -> pq.FileMetaData:
        """A shard's footer: its hashed tail, or, for a dataset without range hashes, the whole
        file checked against its sha256 first."""
        if si not in self._meta:
            shard = self.manifest.shards[si]
            with damaged(self.where(si)):
                if shard.footer is None and self.store.local is not None:
                    md = pq.read_metadata(self.store.local / shard.file)  # hashed when opened
                elif shard.footer is None:
                    md = self._open_whole(si).metadata
                else:
                    md = pq.read_metadata(pa.BufferReader(b"PAR1" + self._fetch(si, shard.footer)))
                    spans = group_spans(md)
                    if [list(x) for x in spans] != [g[:2] for g in shard.row_groups]:
                        raise FormatError(f"{self.where(si)}: its footer places the row groups "
                                          "elsewhere than manifest.json says; regenerate or "
                                          "re-download the dataset")
                if self.manifest.index is not None:  # the plan came from the index: same groups?
                    self._stored_index()
                    if self._groups.get(si, []) != [md.row_group(g).num_rows
                                                    for g in range(md.num_row_groups)]:
                        raise FormatError(f"{self.where(si)}: its row groups differ from "
                                          f"{INDEX}'s; regenerate or re-download the dataset")
                enc = Encoding.from_schema(md.schema.to_arrow_schema())
            m = self.manifest
            if not enc.matches(m):
                raise FormatError(
                    f"{self.where(si)} (format {enc.version}, k={enc.k}, step="
                    f"{enc.logprob_step}, draws={enc.draws}) does not match the manifest (format "
                    f"{m.format_version}, k={m.k}, step={m.logprob_step}, draws={m.draws}); "
                    "regenerate the dataset")
            self._encodings[si], self._meta[si] = enc, md
        return self._meta[si]

    def _open_whole(self, si: int) -> pq.ParquetFile:
        """A shard of a dataset without range hashes, its sha256 checked once: a local file in
        place, a store's object downloaded whole to a temp file. The last stays open (a fresh
        ParquetFile per row group made each read ~2x slower)."""
        if si in self._whole:
            return self._whole[si]
        shard = self.manifest.shards[si]
        if self.store.local is not None:
            path = self.store.local / shard.file
        else:
            if self._tmp is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="softlabels-shard-")
            path = Path(self._tmp.name) / "shard.parquet"
            self.store.download(shard.file, path)
            self.fetched += path.stat().st_size
        if sha256_file(path) != shard.sha256:
            raise FormatError(f"{self.where(si)}: sha256 differs from manifest.json (changed or "
                              "damaged after publishing); `softlabels verify` lists every "
                              "problem: regenerate or re-download the dataset")
        self._whole.clear()
        self._whole[si] = pq.ParquetFile(path)
        return self._whole[si]

    # ------------------------------------------------------------------ planning (no decoding)

    def _stored_index(self) -> RowIndex:
        if self._stored is None:
            a = self._rows()
            key = a[0] * (1 << 32) + a[1]
            starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]]) if len(key) else \
                np.zeros(0, np.int64)
            lengths = np.diff(np.r_[starts, len(key)])
            local = np.arange(len(key)) - np.repeat(starts, lengths)
            for si, n in zip(a[0][starts].tolist(), lengths.tolist()):  # row group sizes
                self._groups.setdefault(si, []).append(n)
            self._stored = RowIndex(a[0], a[1], local, a[2], a[3], a[4])
        return self._stored

    def _rows(self) -> np.ndarray:
        """(5, rows) [shard, group, tokens, targets, ce targets] of every row in stored order:
        from index.parquet (one object), or for a dataset without one from each shard's footer."""
        m = self.manifest
        if m.index is not None:
            info = m.index
            return read_index(self._checked_bytes(info["file"], 0, info["bytes"], info["sha256"]),
                              m.shards)
        with ThreadPoolExecutor(FOOTER_READS) as pool:  # a store's round trips overlap
            list(pool.map(self._footer, [si for si, s in enumerate(m.shards)
                                         if s.footer is not None]))
        rows = []
        for si in range(len(m.shards)):
            with damaged(self.where(si)):
                rows.append(footer_rows(si, self._footer(si),
                                        lambda g, si=si: self._table(si, g)[0]))
        return np.hstack(rows) if rows else np.zeros((5, 0), np.int64)

    def index(self, epoch: int = 0) -> RowIndex:
        """The epoch's row order (see the module docstring); cached for the last epoch asked."""
        if self._epoch and self._epoch[0] == epoch:
            return self._epoch[1]
        stored = self._stored_index()
        if not self.shuffle:
            idx = stored
        else:
            # row groups as (shard, group) runs of the stored order
            key = stored.shard * (1 << 32) + stored.group
            starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
            ends = np.r_[starts[1:], len(key)]
            perm = np.random.default_rng([self.seed, epoch]).permutation(len(starts))
            order = []
            for w in range(0, len(perm), self.window):
                groups = perm[w:w + self.window]
                rows = np.concatenate([np.arange(starts[g], ends[g]) for g in groups])
                order.append(np.random.default_rng([self.seed, epoch, w]).permutation(rows))
            idx = stored.take(np.concatenate(order) if order else np.zeros(0, np.int64))
        self._epoch = (epoch, idx)
        return idx

    # ------------------------------------------------------------------ reading

    def _prefetch(self, keys: list[tuple[int, int]]) -> dict:
        """From a store, the footers and row groups one read needs, fetched at once (their round
        trips overlap): {(shard, group): checked bytes}. A disk needs none of this."""
        todo = [(si, g) for si, g in keys if (si, g) not in self._tables
                and self.manifest.shards[si].row_groups is not None]
        if self.store.local is not None or len(todo) < 2:
            return {}
        with ThreadPoolExecutor(FOOTER_READS) as pool:
            list(pool.map(self._footer, sorted({si for si, _ in todo})))
            data = pool.map(lambda k: self._fetch(k[0], self.manifest.shards[k[0]].row_groups[
                k[1]]), todo)
            return dict(zip(todo, data))

    def _table(self, si: int, g: int, fetched: bytes | None = None) -> tuple[pa.Table, Encoding]:
        """One row group, undecoded, from checked bytes only; with shuffle the last `window` are
        kept."""
        if (si, g) not in self._tables:
            md = self._footer(si)
            shard = self.manifest.shards[si]
            with damaged(self.where(si)):
                if shard.row_groups is None:
                    table = self._open_whole(si).read_row_group(g)
                else:
                    span = shard.row_groups[g]
                    data = fetched if fetched is not None else self._fetch(si, span)
                    window = _Window(shard.bytes, span[0], data)
                    table = pq.ParquetFile(window, metadata=md).read_row_group(g)
            self._tables[(si, g)] = table
            # a shuffle window's groups are revisited; in order, each is read once
            while len(self._tables) > (self.window if self.shuffle else 1):
                self._tables.popitem(last=False)
        return self._tables[(si, g)], self._encodings[si]

    def read(self, epoch: int, positions: np.ndarray) -> list[Row]:
        """The rows at these global positions of the epoch, in that order, checked and decoded."""
        return self.read_index(self.index(epoch).take(np.asarray(positions, np.int64)))

    def read_index(self, idx: RowIndex) -> list[Row]:
        """The rows an index names (shard, group, row and their counts), in its order."""
        rows: list[Row | None] = [None] * len(idx.shard)
        keys = list(dict.fromkeys(zip(idx.shard.tolist(), idx.group.tolist())))
        fetched = self._prefetch(keys)
        for si, g in keys:
            at = np.flatnonzero((idx.shard == si) & (idx.group == g))
            table, enc = self._table(si, g, fetched.pop((si, g), None))
            with damaged(self.where(si)):
                rows_of_group = self._checked(table.take(idx.local[at]), idx, at, si, g, enc)
            for i, row in zip(at.tolist(), rows_of_group):
                rows[i] = row
        self.decoded += len(rows)
        return rows

    def _checked(self, taken: pa.Table, idx: RowIndex, at: np.ndarray, si: int, g: int,
                 enc: Encoding) -> list[Row]:
        """Rows of one row group, checked against their footer counts and the format, decoded."""
        # the footer's counts planned the batches and weigh the loss: they must be true
        counted = count_rows(taken)
        planned = np.stack([idx.tokens[at], idx.kd_positions[at], idx.ce_positions[at]])
        if (counted != planned).any():
            j = int(np.flatnonzero((counted != planned).any(0))[0])
            raise FormatError(
                f"{self.where(si)} row {taken.column('row_id')[j]}: "
                f"tokens/targets {counted[:, j].tolist()}, its footer says "
                f"{planned[:, j].tolist()}; regenerate or re-download the dataset")
        batch = one_batch(taken)
        flat = flatten(batch, enc)
        bad = problems(batch, flat, self.manifest.vocab_size, enc)  # what verify checks
        if bad:
            rid, why = bad[0]
            raise FormatError(
                f"{self.where(si)} row {rid}: {why} ({len(bad)} bad rows "
                f"in row group {g}); this dataset fails `softlabels verify {self.dir}`: "
                "regenerate or re-download it")
        return decode(batch, enc, flat)

    def rows(self, epoch: int = 0, start: int = 0, block: int = 256
             ) -> Iterator[tuple[int, Row]]:
        """Yield (global index, row) for this part, skipping global rows before `start`.

        The global index is the row's position in the epoch's order over all parts, so a
        resumed reader can start exactly where it stopped.
        """
        n = len(self.index(epoch).tokens)
        for a in range(start, n, block):
            mine = np.arange(a, min(a + block, n))
            mine = mine[mine % self.num_parts == self.part]
            if len(mine):
                yield from zip(mine.tolist(), self.read(epoch, mine))

    def __iter__(self) -> Iterator[Row]:
        for _, row in self.rows():
            yield row



class _Window(io.RawIOBase):
    """A file of `size` bytes of which only [start, start + len(data)) is here: pyarrow reads one
    row group through it, and a read anywhere else is an error, not unchecked bytes."""

    def __init__(self, size: int, start: int, data: bytes):
        self.size, self.start, self.data, self.pos = size, start, memoryview(data), 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = (offset, self.pos + offset, self.size + offset)[whence]
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, b) -> int:
        n = max(0, min(len(b), self.size - self.pos))
        a = self.pos - self.start
        if n and not (0 <= a and a + n <= len(self.data)):
            raise OSError(f"a read of bytes {self.pos}..{self.pos + n} outside the row group's "
                          "hashed range")
        b[:n] = self.data[a:a + n]
        self.pos += n
        return n
