"""`megagym train --dry-run`: resolve a run configuration and check it without starting anything.

Owns: the checks a user wants before queueing a long job — the model folder, parallel sizes
against the number of ranks (and GPUs when there are any), whether one trainer rank fits its GPU
(the memory plan of `memory_plan.py`, printed as a table; refused with the largest term and its
knob), the micro-batch budget against the longest sample, every environment's Gym config and
data files, Gym's venv, the policy servers — printed as one list of problems. Must not: start
processes, import vLLM or megatron, or touch the network.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from megagym.config import redacted, to_dict


def plan_memory(cfg, hf: dict, nproc: int = 1, gpu_bytes: float | None = None):
    """The memory plan for `cfg` on `nproc` ranks; checked against `parallel.gpu_memory_gib`, else
    `gpu_bytes` (the visible GPU), else not at all (a CPU run: the plan is shown, nothing refused)."""
    from megagym.launch.memory_plan import GIB, estimate
    from megagym.models import arch_from_config

    device = cfg.parallel.gpu_memory_gib * GIB if cfg.parallel.gpu_memory_gib else gpu_bytes
    return estimate(arch_from_config(hf), cfg, nproc, device, kind="gpu" if device else "cpu")


def problems(cfg, nproc: int = 1, gpus: int | None = None, gpu_bytes: float | None = None,
             plans: list | None = None) -> list[str]:
    """Every problem found; the memory plan (when the model's config.json is readable) is appended
    to `plans` for the caller to print."""
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
        elif not out:
            try:
                plan = plan_memory(cfg, hf, nproc, gpu_bytes)
            except (KeyError, ValueError) as e:  # a config.json the trainer cannot build either
                out.append(f"model.hf_path: {model}/config.json: {e}")
            else:
                if plans is not None:
                    plans.append(plan)
                if plan.problem():
                    out.append(plan.problem())
    longest = cfg.servers.settings.get("max_model_len")
    if longest and int(longest) - 1 > cfg.optim.micro_batch_tokens:
        out.append(f"optim.micro_batch_tokens={cfg.optim.micro_batch_tokens} is smaller than the longest "
                   f"sample the servers can return (servers.settings.max_model_len={longest}): such a "
                   f"sample would stop the step; raise micro_batch_tokens to at least {int(longest) - 1}")
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
    gpus = gpu_bytes = None
    try:
        import torch

        if torch.cuda.is_available():
            gpus = torch.cuda.device_count()
            gpu_bytes = torch.cuda.get_device_properties(0).total_memory
    except ImportError:
        pass
    print(yaml.safe_dump(redacted(to_dict(cfg)), sort_keys=False))
    plans: list = []
    found = problems(cfg, nproc, gpus, gpu_bytes, plans)
    for plan in plans:
        print(plan.table())
    for p in found:
        print(f"problem: {p}")
    print("dry run: OK" if not found else f"dry run: {len(found)} problem(s)")
    return 0 if not found else 1
