"""`megagym convert --to-hf CKPT OUT`: a megagym checkpoint -> an HF folder transformers can load.

Owns: loading the model part of a Megatron distributed checkpoint at TP=PP=1 in one process
(dist_checkpointing reshards from whatever layout it was saved at), streaming it through
`export.iter_hf_tensors`, and writing safetensors shards (+ index when more than one), the
checkpoint's config.json / generation_config.json / tokenizer files. The output is written into
`OUT.tmp-*` and renamed to OUT at the end, so a failed conversion leaves no half folder.
Must not: touch optimizer state or need a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import uuid
from pathlib import Path

import torch

SHARD_BYTES = 4 << 30


def write_safetensors(named_tensors, out: Path, shard_bytes: int = SHARD_BYTES) -> list[str]:
    """Write (name, tensor) pairs into model[-0000i-of-0000n].safetensors (+ index); returns file names."""
    from safetensors.torch import save_file

    shards: list[dict] = [{}]
    size = 0
    for name, t in named_tensors:
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.detach().to("cpu").contiguous().clone()  # no shared storage in safetensors
        size += n
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names, weight_map, total = [], {}, 0
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        names.append(fname)
        for k, v in shard.items():
            weight_map[k] = fname
            total += v.numel() * v.element_size()
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return names


def convert_to_hf(ckpt: str | Path, out: str | Path, shard_bytes: int = SHARD_BYTES) -> Path:
    """Convert checkpoint folder `ckpt` (a complete megagym checkpoint) into HF folder `out`."""
    from megatron.core import dist_checkpointing

    from megagym.trainer.checkpoint import read_state
    from megagym.models import read_arch
    from megagym.trainer.model import build_gpt_model, padded_vocab_size
    from megagym.trainer.parallel import init_distributed
    from megagym.weights.export import iter_hf_tensors

    ckpt, out = Path(ckpt), Path(out)
    state = read_state(ckpt)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new output folder")
    env = init_distributed(1, 1)
    if env.world_size != 1:
        raise RuntimeError("convert runs in one process (it reshards to TP=PP=1); do not launch it with torchrun")
    dtype = torch.bfloat16 if state["model"]["dtype"] == "bfloat16" else torch.float32
    divisible = state["model"]["make_vocab_size_divisible_by"]
    arch = read_arch(ckpt / "hf")
    model = build_gpt_model(arch, dtype, "local", divisible)
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(ckpt / "dist"))
    model.load_state_dict(loaded["model"])
    tmp = out.parent / f".tmp-{out.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        write_safetensors(iter_hf_tensors(model, arch, padded_vocab_size(arch.vocab_size, divisible, 1)), tmp,
                          shard_bytes)
        for f in (ckpt / "hf").iterdir():
            shutil.copyfile(f, tmp / f.name)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg["dtype"] = state["model"]["dtype"]
        cfg.pop("torch_dtype", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="megagym convert", description="convert a megagym checkpoint to an HF folder")
    p.add_argument("--to-hf", nargs=2, metavar=("CKPT", "OUT"), required=True,
                   help="checkpoint folder (with COMPLETE) and the HF folder to create")
    p.add_argument("--shard-gb", type=float, default=SHARD_BYTES / (1 << 30), help="max safetensors shard size")
    a = p.parse_args(argv)
    ckpt, out = a.to_hf
    path = convert_to_hf(ckpt, out, int(a.shard_gb * (1 << 30)))
    print(path)
    from megagym.trainer.parallel import shutdown

    shutdown()
    return 0
