"""The one way to start, wait for and stop the policy servers of a run on one machine.

Owns: the `megagym serve` settings of a run (`server_overrides`: its model dtype, sampling guard,
weight sync, then `servers.settings`, where the KV-cache size travels as `kv_cache_gib`, and a seed
per server), the GPU slice of each server (`gpu_slice`: vLLM tensor parallel = `servers.settings.tensor_parallel_size`
devices each, taken in order from CUDA_VISIBLE_DEVICES), and `policy_servers(cfg, ...)`: start
`servers.count` servers side by side (or pass `servers.urls` through), wait until each answers /health, yield
their URLs, stop every one it started on the way out. Used by the local launcher (`megagym
train`), `megagym eval` and `megagym cluster serve` (one server per Slurm task).
Must not: start Gym or trainer ranks, or know what the servers are used for.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from megagym.server.process import ServerProcess


def server_overrides(cfg, index: int) -> list[str]:
    """`megagym serve` settings of server `index` of this run: its model, sampling guard, weight
    sync, then `servers.settings`; its seed is the run's (or `servers.settings.seed`) + `index`, so
    that servers given the same prompts at the same moment do not draw the same samples."""
    settings = {
        "dtype": cfg.model.dtype,
        "weight_sync": cfg.servers.weight_sync,
        "logprobs_mode": "processed_logprobs",
        "train_sampling.temperature": cfg.rollout.temperature,
        "train_sampling.top_p": cfg.rollout.top_p,
        "validation_sampling.temperature": cfg.val.temperature,
        "validation_sampling.top_p": cfg.val.top_p,
        "seed": cfg.run.seed,
    }
    settings.update(_flatten(cfg.servers.settings))
    settings["seed"] = int(settings["seed"]) + index
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


def gpu_slice(visible: str, local: int, per_server: int, offset: int = 0) -> str:
    """The CUDA_VISIBLE_DEVICES of server `local` on its node: `per_server` devices after `offset`."""
    devices = [d for d in visible.split(",") if d.strip()]
    start = offset + local * per_server
    if per_server <= 0 or not devices:
        return visible
    if start + per_server > len(devices):
        raise RuntimeError(f"server {local} needs devices {start}..{start + per_server - 1} "
                           f"but only {len(devices)} are visible ({visible})")
    return ",".join(devices[start:start + per_server])


def server_gpu_env(cfg, i: int) -> dict[str, str]:
    """Server i's own GPUs out of this machine's visible ones (nothing to set for one server or on CPU)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if not visible or cfg.servers.count == 1:
        return {}
    tp = int(cfg.servers.settings.get("tensor_parallel_size", 1))
    return {"CUDA_VISIBLE_DEVICES": gpu_slice(visible, i, tp)}


@contextmanager
def policy_servers(cfg, model_path: str, log_dir: Path, who: str = "megagym") -> Iterator[list[str]]:
    """URLs of the run's policy servers (base URLs, no /v1): `servers.urls` when set, else
    `servers.count` local servers for `model_path`, started here and stopped on the way out."""
    if cfg.servers.urls:
        yield list(cfg.servers.urls)
        return
    servers = [ServerProcess(str(model_path), overrides=server_overrides(cfg, i),
                             log_path=Path(log_dir) / f"server_{i}.log", env=server_gpu_env(cfg, i))
               for i in range(cfg.servers.count)]
    try:
        for i, sp in enumerate(servers):
            print(f"{who}: starting policy server {i} (log {sp.log_path})", flush=True)
        with ThreadPoolExecutor(len(servers)) as pool:  # side by side: start-up is mostly waiting
            for started in [pool.submit(sp.start, timeout_s=cfg.servers.start_timeout_s) for sp in servers]:
                started.result()
        yield [s.base_url for s in servers]
    finally:
        for sp in servers:
            sp.stop()
