"""Start torch.distributed and Megatron's parallel state from torchrun or Slurm variables.

Owns: reading rank / world size / master address from the environment (torchrun's RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT, or Slurm's SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID),
a single-process fallback, choosing gloo (CPU) or NCCL (CUDA), and `initialize_model_parallel`.
Also the object broadcast by which rank 0 (the loop driver) hands samples to the other ranks.
Must not: build models or know about GRPO.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megagym.server.process import QUIET_PORTS_LOW, free_port


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def read_env() -> DistEnv:
    """Rank layout from torchrun (preferred) or Slurm, else a single process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", 0))
    else:
        rank, world, local = 0, 1, 0
    slurm = "RANK" not in env and "SLURM_PROCID" in env
    addr = env.get("MASTER_ADDR") or (env.get("SLURM_LAUNCH_NODE_IPADDR") if slurm else None) or "127.0.0.1"
    if "MASTER_PORT" in env:
        port = int(env["MASTER_PORT"])
    elif world == 1:
        port = free_port()
    elif slurm and "SLURM_JOB_ID" in env:
        # same on every task of the job, and slurm/train.sh's formula: below the ephemeral range
        port = QUIET_PORTS_LOW + int(env["SLURM_JOB_ID"]) % 10000
    else:
        raise RuntimeError("MASTER_PORT is not set (torchrun sets it; under Slurm export it in the batch script)")
    return DistEnv(rank, world, local, addr, port)


def init_distributed(tensor_parallel: int = 1, pipeline_parallel: int = 1, backend: str = "auto",
                     timeout_minutes: int = 30, seed: int = 1234) -> DistEnv:
    """Initialise torch.distributed (if needed) and Megatron's model-parallel groups.

    Idempotent for the same layout; re-initialises Megatron's groups if the layout changes.
    Seeds torch and Megatron's model-parallel RNG tracker (different streams per TP rank).
    """
    from megatron.core import parallel_state

    from megagym.trainer import cpu_compat

    cpu_compat.activate()
    env = read_env()
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    if env.world_size % (tensor_parallel * pipeline_parallel):
        raise ValueError(
            f"world size {env.world_size} is not divisible by tensor_parallel {tensor_parallel} "
            f"x pipeline_parallel {pipeline_parallel}"
        )
    if parallel_state.model_parallel_is_initialized():
        same = (parallel_state.get_tensor_model_parallel_world_size() == tensor_parallel
                and parallel_state.get_pipeline_model_parallel_world_size() == pipeline_parallel)
        if same:
            return env
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        distributed_timeout_minutes=timeout_minutes,
    )
    seed_everything(seed)
    return env


def seed_everything(seed: int) -> None:
    """Seed python, torch and Megatron's RNG tracker (offset per pipeline stage as Megatron does)."""
    import random

    from megatron.core import parallel_state, tensor_parallel

    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (pickled over the default group; gloo on CPU).

    This is how samples reach all trainer ranks: the loop driver (rank 0) calls the Policy with
    the real list, the other ranks call it with None, and the Policy broadcasts first.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
