"""Atomic Megatron distributed checkpoints of a `Policy`: model, optimizer, scheduler, RNG, step, data position.

Owns: the on-disk layout of a checkpoint and the save / load / find-latest logic.

    <dir>/dist/                    megatron dist_checkpointing (torch_dist): model + optimizer shards
    <dir>/rng/rank_XXXXX.pt        per-rank RNG (python, torch CPU, CUDA, Megatron's tracker)
    <dir>/trainer_state.json       step, scheduler state, caller's extra_state (e.g. data position),
                                   parallel layout, megagym version of the format
    <dir>/hf/                      config.json, generation_config.json, tokenizer files (for convert)
    <dir>/COMPLETE                 written last

Atomicity: everything is written into `<parent>/.tmp-<name>-<nonce>/`; after a barrier rank 0
writes COMPLETE (fsync) and renames the folder to `<dir>` (an atomic rename on one filesystem).
A crash at any earlier point leaves only a `.tmp-*` folder, which `load_checkpoint` refuses and
`latest_checkpoint` ignores. Replacing an existing `<dir>` moves it aside first (a crash in that
window leaves no `<dir>`, never a partial one). `load_checkpoint` requires COMPLETE.
Must not: decide when to checkpoint (the loop does) or know about rollouts.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import uuid
from pathlib import Path

import torch
import torch.distributed as dist

FORMAT = 1
COMPLETE = "COMPLETE"
_HF_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "vocab.json", "merges.txt", "special_tokens_map.json", "chat_template.jinja", "added_tokens.json")
_OPT_META = {"distrib_optim_sharding_type": "dp_reshardable"}


def _before_commit(tmp: Path) -> None:
    """Hook run on rank 0 after every shard is written and before COMPLETE + rename (tests inject crashes)."""


def _in_process_results_queue() -> None:
    """Synchronous saves collect write results in this process; give megatron a plain queue.

    Otherwise megatron (0.16) creates a `multiprocessing.Manager` with the *spawn* context on the
    first save: a new Python process per rank that re-imports the caller's `__main__` (deadlocking
    scripts without a `__main__` guard) and costs seconds on small machines.
    """
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", None) is None:
        filesystem_async._results_queue = queue.Queue()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _sharded_state_dict(policy, is_loading: bool) -> dict:
    from megagym.weights.load import unwrap

    model_sd = unwrap(policy.model).sharded_state_dict()
    opt_sd = policy.optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=_OPT_META)
    return {"model": model_sd, "optimizer": opt_sd}


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + f".tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def save_checkpoint(policy, directory: Path, extra_state: dict) -> Path:
    """Collective. Write `policy`'s full training state to `directory` atomically; returns it."""
    from megatron.core import dist_checkpointing, parallel_state

    directory = Path(directory).absolute()
    nonce = uuid.uuid4().hex[:8] if _rank() == 0 else None
    if dist.is_initialized():
        box = [nonce]
        dist.broadcast_object_list(box, src=0)
        nonce = box[0]
    tmp = directory.parent / f".tmp-{directory.name}-{nonce}"
    if _rank() == 0:
        (tmp / "dist").mkdir(parents=True)
        (tmp / "rng").mkdir()
    _barrier()
    _in_process_results_queue()
    dist_checkpointing.save(_sharded_state_dict(policy, is_loading=False), str(tmp / "dist"))
    torch.save(_rng_state(), tmp / "rng" / f"rank_{_rank():05d}.pt")
    if _rank() == 0:
        hf = tmp / "hf"
        hf.mkdir()
        for name in _HF_FILES:
            src = Path(policy.cfg.model.hf_path) / name
            if src.exists():
                shutil.copyfile(src, hf / name)
        state = {
            "format": FORMAT,
            "step": policy.step,
            "scheduler": policy.scheduler.state_dict(),
            "extra_state": extra_state,
            "layout": {"tensor_parallel": parallel_state.get_tensor_model_parallel_world_size(),
                       "pipeline_parallel": parallel_state.get_pipeline_model_parallel_world_size(),
                       "data_parallel": parallel_state.get_data_parallel_world_size()},
            "model": {"dtype": policy.cfg.model.dtype,
                      "make_vocab_size_divisible_by": policy.cfg.model.make_vocab_size_divisible_by},
        }
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
    _barrier()
    if _rank() == 0:
        _before_commit(tmp)
        with open(tmp / COMPLETE, "w") as f:
            f.write(f"step {policy.step}\n")
            f.flush()
            os.fsync(f.fileno())
        old = None
        if directory.exists():
            old = directory.parent / f".old-{directory.name}-{nonce}"
            os.rename(directory, old)
        os.rename(tmp, directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return directory


def is_complete(directory: Path) -> bool:
    d = Path(directory)
    return (d / COMPLETE).exists() and (d / "trainer_state.json").exists() and not d.name.startswith(".tmp-")


def read_state(directory: Path) -> dict:
    directory = Path(directory)
    if not is_complete(directory):
        raise FileNotFoundError(f"{directory} is not a complete megagym checkpoint (no {COMPLETE} marker)")
    return json.loads((directory / "trainer_state.json").read_text())


def _init_optimizer_state(optimizer) -> None:
    """Give a fresh Adam zero moments and step 0 so its sharded state dict has the loadable shape.

    Megatron (0.16, without Apex/TE) reads `state[p]["step"]` of every parameter when building the
    optimizer's sharded state dict, which a never-stepped torch optimizer does not have yet.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state[p]
                if not st:
                    st["exp_avg"] = torch.zeros_like(p.data)
                    st["exp_avg_sq"] = torch.zeros_like(p.data)
                    st["step"] = torch.tensor(0.0)


def _restore_adam_steps(optimizer, fallback: int) -> None:
    """Set every parameter's Adam `step` (bias correction) to the saved count, one tensor each.

    megatron-core 0.16 with torch's AdamW (no Apex/TE) keeps the count in the param group's
    "step" on save, but after loading into a fresh optimizer the per-parameter `state[p]["step"]`
    was left at 0 (seen: the resumed update then differed from the uninterrupted one); and a single
    step tensor shared by all parameters would be incremented once per parameter per update.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        for group in inner.param_groups:
            count = float(group.get("step", fallback))
            for p in group["params"]:
                st = inner.state.get(p)
                if st is not None and "step" in st:
                    st["step"] = torch.tensor(count, dtype=torch.float32)


def load_checkpoint(policy, directory: Path) -> dict:
    """Collective. Restore model, optimizer, scheduler, RNG and step; returns the saved extra_state."""
    from megatron.core import dist_checkpointing

    from megagym.weights.load import unwrap

    directory = Path(directory)
    state = read_state(directory)
    _init_optimizer_state(policy.optimizer)
    loaded = dist_checkpointing.load(_sharded_state_dict(policy, is_loading=True), str(directory / "dist"))
    with torch.no_grad():  # fp32 main params are views of the (grad-requiring) model params
        unwrap(policy.model).load_state_dict(loaded["model"])
        policy.optimizer.load_state_dict(loaded["optimizer"])
    _restore_adam_steps(policy.optimizer, int(state["step"]))
    policy.scheduler.load_state_dict(state["scheduler"])
    policy.step = int(state["step"])
    rng = directory / "rng" / f"rank_{_rank():05d}.pt"
    if rng.exists():  # absent when resuming at a different world size: keep the fresh seeds
        _set_rng_state(torch.load(rng, weights_only=True))
    _barrier()
    return state["extra_state"]


def latest_checkpoint(root: Path) -> Path | None:
    """The complete `step_*` checkpoint with the highest step under `root`, or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    done = [d for d in root.glob("step_*") if is_complete(d)]
    return max(done, key=lambda d: read_state(d)["step"]) if done else None


def save_step(policy, root: Path, extra_state: dict, keep_last: int = 2) -> Path:
    """Save as `<root>/step_<step>` and keep only the newest `keep_last` complete checkpoints."""
    path = save_checkpoint(policy, Path(root) / f"step_{policy.step:08d}", extra_state)
    if _rank() == 0:
        done = sorted((d for d in Path(root).glob("step_*") if is_complete(d)), key=lambda d: read_state(d)["step"])
        for old in done[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return path
