"""A real single-node Slurm cluster on localhost for tests of the batch scripts.

Owns: installing Slurm and munge from Debian's packages when missing, writing a slurm.conf in a
temporary folder, starting munged, slurmctld and slurmd, waiting for the node to be idle, and
stopping everything by PID. Must not: touch a system-wide Slurm configuration; every path lives
under the cluster's own folder and clients find it through SLURM_CONF.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ["slurm-wlm", "munge"]


def ensure_installed(timeout: float = 600) -> None:
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "munged", "sbatch")):
        return
    if os.geteuid() != 0:
        raise RuntimeError("Slurm is not installed and installing it needs root (apt-get)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, timeout=timeout, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
                   check=True, timeout=timeout, env=env)


def _node_line() -> str:
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    return next(line for line in out.splitlines() if line.startswith("NodeName="))


class LocalSlurm:
    """`with LocalSlurm(dir) as cluster:` — a running controller and node; `cluster.env` for clients."""

    def __init__(self, root: str | Path, port_base: int = 16817):
        self.root = Path(root)
        self.port_base = port_base
        self.conf = self.root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    def write_conf(self) -> None:
        for sub in ("state", "spool", "log", "run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        node = _node_line()
        host = node.split()[0].split("=", 1)[1]
        r = self.root
        self.conf.write_text("\n".join([
            "ClusterName=megagym-test",
            f"SlurmctldHost={socket.gethostname()}(127.0.0.1)",
            f"SlurmctldPort={self.port_base}",
            f"SlurmdPort={self.port_base + 1}",
            "SlurmUser=root",
            "AuthType=auth/munge",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "DefMemPerCPU=1000",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "MailProg=/bin/true",
            "ReturnToService=2",
            "MpiDefault=none",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd.log",
            f"SlurmctldPidFile={r}/run/slurmctld.pid",
            f"SlurmdPidFile={r}/run/slurmd.pid",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=30",
            "InactiveLimit=0",
            "MinJobAge=600",
            "KillWait=5",
            "Waittime=0",
            node + " State=UNKNOWN",
            f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))

    def _start_munge(self) -> None:
        if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0:
            return
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True, timeout=30)

    def start(self, timeout: float = 60) -> "LocalSlurm":
        ensure_installed()
        if self.root.exists():
            shutil.rmtree(self.root)  # a node left DRAIN/INVAL persists in the state dir
        self.write_conf()
        self._start_munge()
        subprocess.run(["slurmctld", "-f", str(self.conf)], check=True, env=self.env, timeout=30)
        subprocess.run(["slurmd", "-f", str(self.conf)], check=True, env=self.env, timeout=30)
        deadline = time.time() + timeout
        state = ""
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=self.env)
            state = out.stdout.strip()
            if state == "idle":
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"Slurm node did not become idle in {timeout}s (state {state!r}); "
                           f"logs in {self.root / 'log'}")

    def stop(self) -> None:
        for name in ("slurmd", "slurmctld"):
            pidfile = self.root / "run" / f"{name}.pid"
            if not pidfile.exists():
                continue
            try:
                pid = int(pidfile.read_text().strip())
                os.kill(pid, signal.SIGTERM)
                for _ in range(50):
                    os.kill(pid, 0)
                    time.sleep(0.1)
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass

    def sbatch(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(["sbatch", *args], capture_output=True, text=True, env=self.env, timeout=timeout)

    def __enter__(self) -> "LocalSlurm":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
