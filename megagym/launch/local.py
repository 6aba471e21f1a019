"""`megagym train` on one machine: policy servers + trainer ranks, all torn down at the end.

Owns: starting `servers.count` `megagym serve` processes for the run's model (unless
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

from megagym.gym.process import STATE_FILE, stop_from_state
from megagym.server.process import ServerProcess, free_port


def server_overrides(cfg) -> list[str]:
    """`megagym serve` settings for this run: its model, sampling guard, weight sync, then `servers.settings`."""
    settings = {
        "dtype": cfg.model.dtype,
        "weight_sync": cfg.servers.weight_sync,
        "logprobs_mode": "processed_logprobs",
        "train_sampling.temperature": cfg.rollout.temperature,
        "train_sampling.top_p": cfg.rollout.top_p,
        "validation_sampling.temperature": cfg.train.val_temperature,
        "validation_sampling.top_p": cfg.train.val_top_p,
        "seed": cfg.run.seed,
    }
    settings.update(_flatten(cfg.servers.settings))
    return [f"{k}={json.dumps(v)}" for k, v in settings.items()]


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


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
    servers: list[ServerProcess] = []
    trainer: subprocess.Popen | None = None
    try:
        urls = list(cfg.servers.urls)
        if not urls:
            for i in range(cfg.servers.count):
                sp = ServerProcess(cfg.model.hf_path, overrides=server_overrides(cfg),
                                   log_path=run_dir / "logs" / f"server_{i}.log",
                                   env=_server_env(cfg))
                print(f"megagym train: starting policy server {i} (log {sp.log_path})", flush=True)
                servers.append(sp.start(timeout_s=cfg.servers.start_timeout_s))
            urls = [s.base_url for s in servers]
        argv = [sys.executable, "-m", "megagym.train", "--worker"]
        if nproc > 1:
            argv = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                    f"--master-port={free_port()}", "-m", "megagym.train", "--worker"]
        argv += ([config_path] if config_path else []) + overrides
        argv += [f"servers.urls={json.dumps(urls)}", f"env.run_dir={json.dumps(str(gym_dir))}"]
        argv += ["--resume"] if resume else []
        trainer = subprocess.Popen(argv, start_new_session=True)
        code = trainer.wait()
        if code:
            print(f"megagym train: the trainer exited with {code}", file=sys.stderr)
        return code
    except (KeyboardInterrupt, _Terminated):
        print("megagym train: interrupted; stopping the run", file=sys.stderr)
        return 130
    finally:
        if trainer is not None and trainer.poll() is None:
            _stop_group(trainer)
        if (gym_dir / STATE_FILE).exists():  # rank 0 died before it could stop Gym
            try:
                stop_from_state(gym_dir)
            except Exception as e:
                print(f"megagym train: stopping Gym: {e}", file=sys.stderr)
        for sp in servers:
            sp.stop()
        signal.signal(signal.SIGTERM, previous)


def _server_env(cfg) -> dict[str, str]:
    gib = cfg.servers.settings.get("kv_cache_gib")
    return {"VLLM_CPU_KVCACHE_SPACE": str(int(gib))} if gib else {}


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
