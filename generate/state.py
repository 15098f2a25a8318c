"""The job's state folder, OUT/.softlabels/: every path in it is named here, and nowhere else.

    job.json                  the Job this folder holds (plan.claim)
    lock                      one `generate` per folder at a time (OutputLock)
    plan/piece-NNNNN.parquet  a piece's windows, one row group per unit; then its .json summary
    plan.json                 every unit and how units are grouped into shards (written last)
    units/<unit>.parquet      a scored unit, committed atomically by the worker that ran it
    done/<unit>.json          its commit record (hash, identity, what it cost)
    written/<unit>.parquet    --response-model: the responses that model wrote for a unit (its
                              token ids and log-probs), before the teacher scores them; .json:
                              its commit record
    shards/<shard>.json       a published shard's record
    attempts.log              one line per time a unit reached the teacher
    tls/, worker-logs/        a --cluster run's certificates and its worker jobs' logs

Readers of the dataset never look in here: the manifest lists what is published. An --output
URL's job keeps its state as write-once objects in the store instead (objects.py), and the
client's own files (tls/, worker-logs/) in `client_dir`.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from softlabels.data.errors import UserError

STATE_DIR = ".softlabels"


def state_dir(out: Path) -> Path:
    return out / STATE_DIR


def client_dir(out) -> Path:
    """Where the client keeps a job's TLS files and worker logs: OUT/.softlabels, or for a URL
    ~/.cache/softlabels/jobs/<its last part>-<hash of it>/.softlabels (the store holds only the
    dataset's state; the folder's name names the worker jobs, as OUT's does)."""
    from softlabels.data.store import is_url

    if not is_url(out):
        return state_dir(out)
    import hashlib

    url = out.rstrip("/")
    name = f"{url.rsplit('/', 1)[-1]}-{hashlib.sha256(url.encode()).hexdigest()[:8]}"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "softlabels" / \
        "jobs" / name / STATE_DIR


def job_path(out: Path) -> Path:
    return out / STATE_DIR / "job.json"


def plan_path(out: Path) -> Path:
    return out / STATE_DIR / "plan.json"


def piece_path(out: Path, piece: int, suffix: str) -> Path:
    return out / STATE_DIR / "plan" / f"piece-{piece:05d}{suffix}"


def unit_path(out: Path, unit) -> Path:
    return out / STATE_DIR / "units" / unit.name


def done_dir(out: Path) -> Path:
    return out / STATE_DIR / "done"


def done_path(out: Path, unit) -> Path:
    return done_dir(out) / f"{unit.name}.json"


def written_dir(out: Path) -> Path:
    return out / STATE_DIR / "written"


def written_path(out: Path, unit, suffix: str = "") -> Path:
    return written_dir(out) / f"{unit.name}{suffix}"


def shard_record_path(out: Path, shard) -> Path:
    return out / STATE_DIR / "shards" / f"{shard.name}.json"


def attempts_path(out: Path) -> Path:
    return out / STATE_DIR / "attempts.log"


class OutputLock:
    """One `generate` per output folder: a second one is refused, not interleaved."""

    def __init__(self, out: Path | str):
        from softlabels.data.store import is_url

        self.fd = None
        if is_url(out):  # a store's commits are write-once: two runs cannot interleave badly
            return
        state_dir(out).mkdir(parents=True, exist_ok=True)
        self.fd = os.open(state_dir(out) / "lock", os.O_CREAT | os.O_RDWR)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            os.close(self.fd)
            raise UserError(f"another softlabels generate is writing {out}; wait for it to "
                            "finish (or stop it) before running this one") from e

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
