"""A real single-node Slurm for the tests: munged, slurmctld and slurmd on loopback, as root.

`start(folder)` installs Debian's slurm-wlm and munge if they are missing, writes a slurm.conf
into `folder` and starts the daemons; it returns what clients need (SLURM_CONF) and the pids it
started, which `stop` ends (never by name: a daemon someone else runs is left alone). It raises
`Unavailable` with the reason where it cannot run (not root, no apt-get, no Debian packages).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path


class Unavailable(RuntimeError):
    """Slurm cannot run here; the message says why."""


def _install() -> None:
    if shutil.which("slurmctld") and shutil.which("munged"):
        return
    if not shutil.which("apt-get"):
        raise Unavailable("slurm-wlm is not installed and there is no apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"]):
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if p.returncode:
            raise Unavailable(f"{' '.join(cmd)} failed: {p.stderr.strip()[-300:]}")


def _munge(folder: Path) -> int | None:
    """A running munged (ours: its pid; someone else's: None)."""
    if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0:
        return None
    key = Path("/etc/munge/munge.key")
    for d in ("/etc/munge", "/run/munge", "/var/log/munge", "/var/lib/munge"):
        Path(d).mkdir(parents=True, exist_ok=True)
    if not key.is_file():
        subprocess.run(["mungekey", "--create"], check=True, capture_output=True)
    subprocess.run(["chown", "-R", "munge:munge", "/etc/munge", "/run/munge", "/var/log/munge",
                    "/var/lib/munge"], check=True)
    key.chmod(0o400)
    pidfile = folder / "munged.pid"
    subprocess.run(["munged", "--force", f"--pid-file={pidfile}"], check=True,
                   capture_output=True)
    return int(pidfile.read_text())


def start(folder: Path, cpus: int | None = None) -> dict:
    if os.geteuid() != 0:
        raise Unavailable("starting Slurm's daemons needs root")
    _install()
    folder.mkdir(parents=True, exist_ok=True)
    pids = []
    munge_pid = _munge(folder)
    if munge_pid:
        pids.append(munge_pid)
    host = socket.gethostname().split(".")[0]
    cpus = cpus or os.cpu_count()
    mem = int(int(open("/proc/meminfo").readline().split()[1]) / 1024 * 0.8)
    conf = folder / "slurm.conf"
    for d in ("state", "spool"):
        (folder / d).mkdir(exist_ok=True)
    conf.write_text(f"""ClusterName=softlabels-test
SlurmctldHost={host}(127.0.0.1)
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmdSpoolDir={folder}/spool
StateSaveLocation={folder}/state
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
ReturnToService=2
SlurmUser=root
AuthType=auth/munge
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
KillWait=2
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
""")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    for daemon in ("slurmctld", "slurmd"):
        subprocess.run([daemon, "-f", str(conf)], check=True, env=env, capture_output=True)
        pidfile = folder / f"{daemon}.pid"
        for _ in range(100):
            if pidfile.is_file() and pidfile.read_text().strip():
                break
            time.sleep(0.1)
        pids.append(int(pidfile.read_text()))
        time.sleep(1)
    for _ in range(120):
        p = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, env=env)
        if p.stdout.strip() in ("idle", "mix", "alloc"):
            break
        time.sleep(0.5)
    else:
        stop({"pids": pids, "env": env})
        raise Unavailable(f"Slurm's node did not come up: sinfo says {p.stdout.strip()!r}")
    return {"env": env, "pids": pids, "conf": conf}


def stop(slurm: dict) -> None:
    """Cancel every job, then end the daemons this helper started (by pid)."""
    subprocess.run(["scancel", "--full", "--user", "root"], capture_output=True,
                   env=slurm["env"])
    for pid in reversed(slurm["pids"]):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        for _ in range(50):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
