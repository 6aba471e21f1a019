"""Stopping the processes of a Gym stack: its process group and every process carrying its run marker.

Owns: finding live processes whose environment carries `MEGAGYM_GYM_RUN=<run id>` (Ray's workers
leave the process group but keep the marker), telling whether a PID is alive, listing a PID's
children, and `kill_run`: SIGINT to the group (Gym's own clean shutdown), then SIGTERM, then
SIGKILL to the group and every marked process, bounded, naming what is left.
Must not: signal any process that does not carry the run marker or belong to the given group.
"""

from __future__ import annotations

import os
import signal
import time

from megagym.gym.compose import RUN_MARKER_ENV


def marker_pids(run_id: str) -> list[int]:
    """Live (non-zombie) processes whose environment carries MEGAGYM_GYM_RUN=<run_id>."""
    needle = f"{RUN_MARKER_ENV}={run_id}".encode()
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            if _proc_state(pid) in ("Z", "X", None):
                continue
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        out.append(pid)
    return out


def _proc_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return None


def pid_alive(pid: int | None) -> bool:
    return pid is not None and _proc_state(pid) not in (None, "Z", "X")


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:160]
    except FileNotFoundError:
        return "?"


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _wait_gone(run_id: str, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    left = marker_pids(run_id)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = marker_pids(run_id)
    return left


def kill_run(run_id: str, pgid: int | None, main_pid: int | None, timeout: float,
             wait_main=None) -> list[str]:
    """SIGINT the group (Gym's own clean shutdown), then SIGTERM, then SIGKILL every marked process.

    Returns descriptions of processes still alive at the end (empty when all are gone).
    """
    graceful = max(1.0, 0.6 * timeout)
    if pgid is not None and pid_alive(main_pid):
        try:
            os.killpg(pgid, signal.SIGINT)
        except ProcessLookupError:
            pass
        if wait_main is not None:
            wait_main(graceful)
        else:
            deadline = time.monotonic() + graceful
            while pid_alive(main_pid) and time.monotonic() < deadline:
                time.sleep(0.2)
    for sig, wait_s in ((signal.SIGTERM, max(1.0, 0.2 * timeout)), (signal.SIGKILL, 5.0)):
        left = marker_pids(run_id)
        if pgid is not None:
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                pass
        if not left:
            break
        _signal_all(left, sig)
        _wait_gone(run_id, wait_s)
    return [f"pid {p}: {_cmdline(p)}" for p in marker_pids(run_id)]



def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except FileNotFoundError:
        return []


def has_live_child_or_self(pid: int) -> bool:
    kids = children(pid)
    return pid_alive(pid) and (not kids or any(pid_alive(k) for k in kids))
