"""`megagym train` on one machine: policy servers + trainer ranks, all torn down at the end.

Owns: the run's policy servers (`launch/servers.py`: `servers.count` local ones unless
`servers.urls` names running ones), then the trainer ranks (in this process for one rank,
under torchrun for more) with the server URLs passed on, and stopping every process it started
on normal exit, error, Ctrl-C or SIGTERM. Rank 0 of the trainer starts and stops Gym itself, so
the same worker runs unchanged under Slurm.
Must not: contain training logic; the worker is `megagym.train.train`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from megagym.gym.stack import STATE_FILE, stop_from_state
from megagym.launch.servers import policy_servers
from megagym.server.process import free_port


class _Terminated(Exception):
    pass


def _raise_on_sigterm(signum, frame):
    raise _Terminated(f"signal {signum}")


TINY_PREFIX = "tiny-random:"


def materialize_model(cfg) -> list[str]:
    """`model.hf_path: tiny-random:DIR` (the CPU demo): write a seeded tiny random Qwen3 to DIR once.

    Returns the override that points the trainer ranks at the real folder."""
    path = cfg.model.hf_path
    if not path.startswith(TINY_PREFIX):
        return []
    folder = Path(path[len(TINY_PREFIX):])
    if not (folder / "config.json").exists():
        from megagym.testing.tiny_qwen3 import write_tiny_qwen3

        print(f"megagym train: writing a tiny random Qwen3 to {folder}", flush=True)
        write_tiny_qwen3(folder, seed=cfg.run.seed)
    cfg.model.hf_path = str(folder)
    return [f"model.hf_path={json.dumps(str(folder))}"]


def run_local(cfg, config_path: str | None, overrides: list[str], resume: bool, nproc: int) -> int:
    """Start servers (if needed) and the trainer ranks; return the trainer's exit code.

    The trainer always runs in its own process group so that this process survives it (an OOM
    kill picks the biggest process) and can still stop Gym, which rank 0 started, from its state
    file, and the servers."""
    overrides = list(overrides) + materialize_model(cfg)
    run_dir = Path(cfg.run.output_dir)
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    gym_dir = Path(cfg.env.run_dir or run_dir / "gym")
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        with policy_servers(cfg, cfg.model.hf_path, run_dir / "logs", "megagym train") as urls:
            return _run_trainer(urls, config_path, overrides, resume, nproc, gym_dir, run_dir / "logs")
    except (KeyboardInterrupt, _Terminated):
        print("megagym train: interrupted; stopping the run", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_trainer(urls: list[str], config_path: str | None, overrides: list[str], resume: bool, nproc: int,
                 gym_dir: Path, log_dir: Path) -> int:
    """The trainer ranks in their own process group; they and Gym are stopped before the servers."""
    argv = [sys.executable, "-m", "megagym.train", "--worker"]
    if nproc > 1:
        argv = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                f"--master-port={free_port()}", f"--log-dir={log_dir / 'torchrun'}",  # not a temp dir of its own
                "-m", "megagym.train", "--worker"]
    argv += ([config_path] if config_path else []) + overrides
    argv += [f"servers.urls={json.dumps(urls)}", f"env.run_dir={json.dumps(str(gym_dir))}"]
    argv += ["--resume"] if resume else []
    trainer = None
    try:
        trainer = subprocess.Popen(argv, start_new_session=True)
        code = trainer.wait()
        if code:
            print(f"megagym train: the trainer exited with {code}", file=sys.stderr)
        return code
    finally:
        if trainer is not None and trainer.poll() is None:
            _stop_group(trainer)
        if (gym_dir / STATE_FILE).exists():  # rank 0 died before it could stop Gym
            try:
                stop_from_state(gym_dir)
            except Exception as e:
                print(f"megagym train: stopping Gym: {e}", file=sys.stderr)


def _stop_group(proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """SIGTERM the trainer's group (ranks stop Gym on the way out), then SIGKILL what is left."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout_s)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
