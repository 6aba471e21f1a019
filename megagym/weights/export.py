"""Stream a TP x PP sharded Megatron GPTModel as full HF-named tensors, optionally in byte buckets.

Owns: gathering each parameter's TP shards (all_gather in the TP group), converting them to HF
tensors with the family map (QKV de-interleaved per query group, fused gate/up split, vocab
padding dropped, tied output layer skipped), and bringing every pipeline stage's tensors to
global rank 0 (point-to-point in order of stages). Must not: write files or talk to vLLM; the
weight-sync backend (`megagym/weights/sync/`) and `convert.py` consume these iterators.

API (collective: EVERY rank must iterate the generator to its end; tensors come out on global
rank 0 only, other ranks' generators yield nothing):
    iter_hf_tensors(model, arch, padded_vocab)  -> Iterator[(hf_name, tensor)]
    iter_hf_buckets(model, arch, padded_vocab, bucket_bytes) -> Iterator[list[(hf_name, tensor)]]
Tensors are in the model's dtype, on the model's device. At TP=PP=1 norm weights and row/column
shards are views of the live parameters: copy them if you keep them past the next optimizer
step. Cost per call: one all_gather per parameter at TP>1, one send per HF tensor per non-first
stage at PP>1; the per-stage name/shape plan is computed once and cached on the model.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist

from megagym.models import family_of
from megagym.weights.load import global_named_parameters, unwrap

_PLAN_ATTR = "_megagym_export_plan"


def _groups():
    from megatron.core import parallel_state as ps

    return dict(
        tp_group=ps.get_tensor_model_parallel_group(), tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(), pp_group=ps.get_pipeline_model_parallel_group(),
        pp_rank=ps.get_pipeline_model_parallel_rank(), pp_size=ps.get_pipeline_model_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(), pp_ranks=dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group())
        if dist.is_initialized() else [0],
    )


def _local_plan(model, arch, padded_vocab, tp_size) -> list[tuple[str, tuple, torch.dtype]]:
    """(hf_name, shape, dtype) of every HF tensor this stage exports, in export order (via meta tensors)."""
    fam = family_of(arch).weights
    out = []
    for name, p in global_named_parameters(model):
        if not fam.exported(name, arch):
            continue
        meta = [torch.empty(p.shape, dtype=p.dtype, device="meta") for _ in range(tp_size)]
        for hf_name, t in fam.param_map(name, arch, padded_vocab).from_shards(meta).items():
            out.append((hf_name, tuple(t.shape), p.dtype))
    return out


def _stage_plans(model, arch, padded_vocab, g) -> list:
    gpt = unwrap(model)
    plans = getattr(gpt, _PLAN_ATTR, None)
    if plans is None:
        mine = _local_plan(model, arch, padded_vocab, g["tp_size"])
        plans = [mine]
        if g["pp_size"] > 1:
            plans = [None] * g["pp_size"]
            dist.all_gather_object(plans, mine, group=g["pp_group"])
        setattr(gpt, _PLAN_ATTR, plans)
    return plans


def _gather_tp(t: torch.Tensor, g) -> list[torch.Tensor]:
    if g["tp_size"] == 1:
        return [t]
    parts = [torch.empty_like(t) for _ in range(g["tp_size"])]
    dist.all_gather(parts, t.contiguous(), group=g["tp_group"])
    return parts


def iter_hf_tensors(model, arch, padded_vocab: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Full HF-named tensors of the whole model on global rank 0 (collective; see module doc)."""
    fam = family_of(arch).weights
    g = _groups()
    plans = _stage_plans(model, arch, padded_vocab, g)
    if g["dp_rank"] != 0:
        return  # one model replica (DP rank 0) exports; the others hold identical weights
    first = g["pp_ranks"][0]
    is_root = g["pp_rank"] == 0 and g["tp_rank"] == 0
    local = [(n, p) for n, p in global_named_parameters(model) if fam.exported(n, arch)]
    for stage in range(g["pp_size"]):
        if stage == g["pp_rank"]:
            for name, p in local:
                shards = _gather_tp(p.detach(), g)
                if g["tp_rank"] != 0:
                    continue
                for hf_name, t in fam.param_map(name, arch, padded_vocab).from_shards(shards).items():
                    if stage == 0:
                        yield hf_name, t
                    else:
                        dist.send(t.contiguous(), dst=first)
        elif is_root:
            src = g["pp_ranks"][stage]
            device = next(unwrap(model).parameters()).device
            for hf_name, shape, dtype in plans[stage]:
                buf = torch.empty(shape, dtype=dtype, device=device)
                dist.recv(buf, src=src)
                yield hf_name, buf


def iter_hf_buckets(model, arch, padded_vocab: int, bucket_bytes: int = 256 << 20) -> Iterator[list]:
    """`iter_hf_tensors` grouped into lists of at most `bucket_bytes` (a larger tensor goes alone)."""
    bucket: list = []
    size = 0
    for name, t in iter_hf_tensors(model, arch, padded_vocab):
        n = t.numel() * t.element_size()
        if bucket and size + n > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += n
    if bucket:
        yield bucket
