"""`megagym train --dry-run`: resolve a run configuration and check it without starting anything.

Owns: the checks a user wants before queueing a long job — the model folder, parallel sizes
against the number of ranks (and GPUs when there are any), every environment's Gym config and
data files, Gym's venv, the policy servers — printed as one list of problems. Must not: start
processes, import vLLM or megatron, or touch the network.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from megagym.config import redacted, to_dict


def problems(cfg, nproc: int = 1, gpus: int | None = None) -> list[str]:
    from megagym.gym.compose import gym_install_root
    from megagym.config import ConfigError
    from megagym.gym.config import resolve_environments, resolve_path

    out: list[str] = []
    model = Path(cfg.model.hf_path) if cfg.model.hf_path else None
    if model is None:
        out.append("model.hf_path: not set")
    elif cfg.model.hf_path.startswith("tiny-random:"):
        pass  # written by the launcher on first use
    elif not (model / "config.json").exists():
        out.append(f"model.hf_path: {model} has no config.json")
    else:
        hf = json.loads((model / "config.json").read_text())
        heads, kv = hf.get("num_attention_heads", 1), hf.get("num_key_value_heads", 1)
        tp = cfg.parallel.tensor_parallel
        if heads % tp or kv % tp and tp % kv:
            out.append(f"parallel.tensor_parallel={tp} does not divide the model's {heads} heads / {kv} KV heads")
        if hf.get("num_hidden_layers", 1) % cfg.parallel.pipeline_parallel:
            out.append(f"parallel.pipeline_parallel={cfg.parallel.pipeline_parallel} does not divide "
                       f"{hf.get('num_hidden_layers')} layers")
    mp = cfg.parallel.tensor_parallel * cfg.parallel.pipeline_parallel
    if nproc % mp:
        out.append(f"{nproc} trainer ranks are not a multiple of tensor_parallel x pipeline_parallel = {mp}")
    if gpus is not None and nproc > gpus:
        out.append(f"{nproc} trainer ranks need {nproc} GPUs; {gpus} visible")
    try:
        specs = resolve_environments(cfg.env)
    except ConfigError as e:
        return out + [str(e)]
    if not specs:
        out.append("env.environments: no environment chosen")
    gym_root = None
    try:
        gym_root = gym_install_root(cfg.env.venv)
    except Exception as e:  # Gym's venv missing or broken
        out.append(str(e))
    for name, spec in specs.items():
        for split in ("train_data", "validation_data"):
            path = getattr(spec, split)
            if not path or (path.startswith("gym:") and gym_root is None):
                continue
            if not resolve_path(path, gym_root).exists():
                out.append(f"environment '{name}': {split} {path} does not exist")
    if cfg.servers.urls and cfg.servers.weight_sync == "shm" and any(
            not u.startswith(("http://127.", "http://localhost")) for u in cfg.servers.urls):
        out.append("servers.weight_sync=shm needs servers on this host; use nccl for other nodes")
    return out


def check(cfg, nproc: int = 1) -> int:
    gpus = None
    try:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else None
    except ImportError:
        pass
    print(yaml.safe_dump(redacted(to_dict(cfg)), sort_keys=False))
    found = problems(cfg, nproc, gpus)
    for p in found:
        print(f"problem: {p}")
    print("dry run: OK" if not found else f"dry run: {len(found)} problem(s)")
    return 0 if not found else 1
