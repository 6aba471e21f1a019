"""torchrun worker: the benchmark-scale options give the same numbers as the plain step.

argv: HF_DIR OUT_JSON. 4 ranks. For each layout (TP1 = DP4, TP2 x DP2, PP2 x DP2) a baseline
policy and variants (activation recomputation full-uniform / full-block / selective, chunked
logprobs, sequence packing, sequence parallelism at TP2, and all of them together) each take
no-grad logprobs and one train step on the same samples; every rank compares its local gradient
shards (Megatron's `main_grad`, all-reduced over DP: no distributed optimizer, no clipping) and
the metrics with the baseline's: per tensor, the largest element difference over the tensor's
largest element (`grad_rel`) and the norm of the difference over the tensor's norm (`grad_norm_rel`). Rank 0 writes the largest differences per layout and variant.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import make_cfg  # noqa: E402

from megagym.trainer.advantages import assign_advantages  # noqa: E402
from megagym.trainer.head import unwrap  # noqa: E402
from megagym.trainer.policy import Policy  # noqa: E402
from megagym.types import Sample  # noqa: E402

hf_dir, out_path = sys.argv[1], Path(sys.argv[2])
rank = dist.get_rank() if dist.is_initialized() else int(__import__("os").environ["RANK"])
TEMP = 0.8


def make_samples():
    g = torch.Generator().manual_seed(5)
    out = []
    shapes = [(5, 6), (4, 12), (7, 3), (3, 15), (6, 8), (2, 4), (9, 9), (3, 2), (4, 20), (6, 5), (2, 7), (5, 11)]
    for i, (prompt, gen) in enumerate(shapes):
        ids = torch.randint(0, 151000, (prompt + gen,), generator=g).tolist()
        noise = torch.randn(prompt + gen, generator=g) * 0.3
        out.append(Sample(token_ids=ids, loss_mask=[0] * prompt + [1] * gen,
                          gen_logprobs=(noise - 11.9).tolist(), reward=float(i % 3) / 2, group_index=i // 4))
    assign_advantages(out, normalize_std=True)
    return out


SAMPLES = make_samples()
OPTIM = {"lr": 1e-3, "micro_batch_tokens": 48, "clip_grad": 0.0, "distributed_optimizer": False}
VARIANTS = {
    "full_uniform": ({"recompute": "full", "recompute_method": "uniform", "recompute_num_layers": 1}, {}),
    "full_block": ({"recompute": "full", "recompute_method": "block", "recompute_num_layers": 1}, {}),
    "selective": ({"recompute": "selective"}, {}),
    "chunked": ({}, {"logprob_chunk_tokens": 7}),
    "packed": ({}, {"pack_sequences": True}),
    "sequence_parallel": ({"sequence_parallel": True}, {}),
    "all": ({"sequence_parallel": True, "recompute": "full"}, {"pack_sequences": True, "logprob_chunk_tokens": 16}),
}
LAYOUTS = {"tp1": (1, 1, ["full_uniform", "full_block", "selective", "chunked", "packed"]),
           "tp2": (2, 1, ["packed", "sequence_parallel", "all"]),
           "pp2": (1, 2, ["full_uniform", "packed"])}


def run(tp, pp, parallel=None, optim=None):
    policy = Policy.build(make_cfg(hf_dir, tp, pp, parallel=dict(parallel or {}),
                                   optim={**OPTIM, **(optim or {})}, grpo={"temperature": TEMP}))
    lps = policy.compute_logprobs(SAMPLES if rank == 0 else None)
    metrics = policy.train_step(SAMPLES if rank == 0 else None)
    grads = {n: p.main_grad.detach().clone() for n, p in unwrap(policy.model).named_parameters()}
    recompute = unwrap(policy.model).config.recompute_granularity
    del policy
    dist.barrier()
    return lps, metrics, grads, recompute


def worst(values) -> float:
    t = torch.tensor([max(values, default=0.0)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


results = {}
only = sys.argv[3:]  # optional: layout names to run (debugging)
for layout, (tp, pp, names) in LAYOUTS.items():
    if only and layout not in only:
        continue
    base_lps, base_m, base_g, _ = run(tp, pp)
    results[layout] = {"base_loss": base_m["loss"]}
    for name in names:
        par, opt = VARIANTS[name]
        if tp == 1 and par.get("sequence_parallel"):
            continue
        lps, m, grads, recompute = run(tp, pp, par, opt)
        rels = {k: float((grads[k] - base_g[k]).abs().max()) / max(float(base_g[k].abs().max()), 1e-30)
                for k in grads}  # largest element difference / the tensor's largest element
        norm_rels = [float((grads[k] - base_g[k]).norm()) / max(float(base_g[k].norm()), 1e-30) for k in grads]
        grad_rel, grad_norm_rel = worst(list(rels.values())), worst(norm_rels)
        r = {"loss_rel": abs(m["loss"] - base_m["loss"]) / abs(base_m["loss"]),
             "entropy_abs": abs(m["entropy"] - base_m["entropy"]), "tokens": [m["tokens"], base_m["tokens"]],
             "grad_rel": grad_rel, "grad_norm_rel": grad_norm_rel, "recompute": recompute,
             "worst_on_rank0": max(rels, key=rels.get)}
        if rank == 0:
            r["logprob_abs"] = max(float((a - b).abs().max()) for a, b in zip(lps, base_lps))
            r["logprob_len_ok"] = all(len(a) == len(s.token_ids) for a, s in zip(lps, SAMPLES))
        results[layout][name] = r

if rank == 0:
    out_path.write_text(json.dumps(results, indent=1))
dist.barrier()
dist.destroy_process_group()
