"""A one-node Slurm on this machine, for tests/test_slurm.py: Debian's munge and slurm-wlm (Slurm
22.05; ``apt-get install slurm-wlm munge``), munged, slurmctld and slurmd run in the foreground
as children of this process, every file (key, sockets, state, logs, slurm.conf) under one
folder, on free ports: nothing of the machine's own Slurm or munge is used or changed. One node
with the machine's CPUs, partition ``debug``, no accounting (no slurmdbd), no cgroups
(``proctrack/linuxproc``, ``task/none``). Needs root (slurmd starts jobs as their user).

By hand: ``python tests/slurm_cluster.py [DIR]`` starts one and prints the ``SLURM_CONF`` to
export; Ctrl-C or SIGTERM stops it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: what a cluster and the tests need on PATH
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo")
PARTITION = "debug"


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def _which(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class LocalSlurm:
    """``start()`` the daemons, ``env()`` for the commands that talk to them, ``stop()``."""

    def __init__(self, root: str | Path | None = None):
        # not under pytest's tmp_path: munged wants its socket's folders readable by all (0755)
        self.own_root = root is None  # stop() removes a folder it made
        self.root = Path(root or tempfile.mkdtemp(prefix="moebench-slurm-", dir="/tmp"))
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}

    def env(self) -> dict:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _conf(self, ctld_port: int, d_port: int) -> str:
        r = self.root
        return "\n".join([
            "ClusterName=moebench", f"SlurmctldHost={self.node}(127.0.0.1)", f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={d_port}", "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge",
            "CredType=cred/munge", f"AuthInfo=socket={r}/munge/munge.socket", f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool", f"SlurmctldPidFile={r}/slurmctld.pid", f"SlurmdPidFile={r}/slurmd.pid",
            f"SlurmctldLogFile={r}/slurmctld.log", f"SlurmdLogFile={r}/slurmd.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU", "SchedulerType=sched/backfill",
            "ReturnToService=2", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} State=UNKNOWN",
            f"PartitionName={PARTITION} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP", "",
        ])

    def _spawn(self, name: str, *args: str) -> None:
        log = open(self.root / f"{name}.out", "w")
        self.procs[name] = subprocess.Popen([_which(name), *args], stdout=log, stderr=subprocess.STDOUT,
                                            env=self.env(), start_new_session=True)
        log.close()

    def _alive(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with status {p.returncode}: {self.log_tail(name)}")

    def log_tail(self, name: str, n: int = 5) -> str:
        lines = []
        for f in (self.root / f"{name}.out", self.root / f"{name}.log", self.root / "munge" / f"{name}.log"):
            if f.is_file():
                lines += f.read_text(errors="replace").splitlines()[-n:]
        return " | ".join(lines)

    def start(self, timeout: float = 60) -> "LocalSlurm":
        r = self.root
        r.chmod(0o755)
        for d in ("state", "spool", "munge"):
            (r / d).mkdir(exist_ok=True)
        (r / "munge").chmod(0o755)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self._spawn("munged", "--foreground", f"--socket={r}/munge/munge.socket", f"--key-file={key}",
                    f"--pid-file={r}/munge/munged.pid", f"--log-file={r}/munge/munged.log",
                    f"--seed-file={r}/munge/munged.seed")
        self._wait(lambda: (r / "munge" / "munge.socket").exists(), timeout, "munged's socket")
        self.conf.write_text(self._conf(*_free_ports(2)))
        self._spawn("slurmctld", "-D", "-f", str(self.conf))
        self._spawn("slurmd", "-D", "-N", self.node, "-f", str(self.conf))
        self._wait(self.idle, timeout, f"node {self.node} idle in sinfo")
        return self

    def idle(self) -> bool:
        p = subprocess.run(["sinfo", "-h", "-n", self.node, "-o", "%T"], capture_output=True, text=True,
                           env=self.env())
        return p.returncode == 0 and p.stdout.strip() == "idle"

    def _wait(self, ready, timeout: float, what: str) -> None:
        t0 = time.monotonic()
        while not ready():
            self._alive()
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"local Slurm: no {what} after {timeout:.0f}s; logs in {self.root}: "
                                   + "; ".join(self.log_tail(n) for n in self.procs))
            time.sleep(0.2)

    def squeue(self) -> dict[str, str]:
        """Every job slurmctld knows (finished ones too): {job id: state}."""
        p = subprocess.run(["squeue", "--states=all", "-h", "-o", "%i|%T"], capture_output=True, text=True,
                           env=self.env())
        return dict(ln.split("|", 1) for ln in p.stdout.split())

    def stop(self) -> None:
        """Cancel every job, then stop slurmd, slurmctld and munged (SIGTERM, then SIGKILL)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--user=root"], capture_output=True, env=self.env())
            t0 = time.monotonic()
            while any(s in ("RUNNING", "COMPLETING", "PENDING") for s in self.squeue().values()) \
                    and time.monotonic() - t0 < 30:
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.pop(name, None)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self.own_root:
            shutil.rmtree(self.root, ignore_errors=True)


if __name__ == "__main__":
    cluster = LocalSlurm(sys.argv[1] if len(sys.argv) > 1 else None).start()
    print(f"export SLURM_CONF={cluster.conf}   # Ctrl-C (or SIGTERM) stops the cluster", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
