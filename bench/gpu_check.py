"""Checks for a lent GPU machine (torch + transformers there; megatron-core from a carried wheel).

Three parts, one process each, printed as tables (run through bench/gpu_check.sh):
  logprobs  bf16 Megatron (local spec: no transformer-engine on the lent machines) vs transformers
            bf16 logprobs of a small random Qwen3 (max |diff|, mean k3 gen-KL; peers: ~1e-3)
  memory    the memory plan (`megagym.launch.memory_plan`, kind "gpu", local spec) vs
            `torch.cuda.max_memory_allocated` over one train step, on two configs (no recompute,
            full recompute); the plan's runtime term (CUDA context, allocator slack) is not in
            max_memory_allocated, so the table compares the plan without it
  packing   packed (mask layout on the local spec) vs padded tokens/s on a length-skewed batch

    python bench/gpu_check.py logprobs|memory|packing [--out DIR]
The model is written with transformers' Qwen3Config directly (no tokenizer needed on the device).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPE = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=16,
             num_key_value_heads=8, head_dim=64, vocab_size=151936, max_position_embeddings=8192,
             rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)  # ~0.3B parameters


def write_model(out: Path) -> Path:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(**SHAPE, torch_dtype="bfloat16"))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    return out


def cfg_for(hf_dir: Path, budget: int, **sections):
    from megagym.config.loader import build
    from megagym.config.schema import RunConfig

    data = {"model": {"hf_path": str(hf_dir), "dtype": "bfloat16", "layer_spec": "local"},
            "optim": {"lr": 1e-6, "micro_batch_tokens": budget, "clip_grad": 1.0}}
    for k, v in sections.items():
        data.setdefault(k, {}).update(v)
    return build(RunConfig, data)


def samples_of(lengths: list[int], seed: int = 0):
    from train_memory import make_samples

    return make_samples(lengths, seed)


def part_logprobs(hf_dir: Path) -> dict:
    from transformers import AutoModelForCausalLM

    from megagym.trainer.policy import Policy

    policy = Policy.build(cfg_for(hf_dir, 4096))
    samples = samples_of([512, 300, 1024, 77])
    lps = policy.compute_logprobs(samples)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16).cuda().eval()
    diff, k3 = [], []
    with torch.no_grad():
        for s, lp in zip(samples, lps):
            ids = torch.tensor([s.token_ids], device="cuda")
            ref = torch.log_softmax(hf(ids).logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None])[:, 0].cpu()
            d = ref - lp[1:]
            diff.append(float(d.abs().max()))
            k3.append(float((torch.exp(d) - d - 1).mean()))
    r = {"max_abs_diff": max(diff), "mean_k3": statistics.mean(k3)}
    print(f"bf16 Megatron (local spec) vs transformers bf16: max |logprob diff| {r['max_abs_diff']:.4f}, "
          f"mean k3 gen-KL {r['mean_k3']:.2e} (peers ~1e-3; 1e-2 means a bug)")
    return r


def part_memory(hf_dir: Path) -> dict:
    from megagym.launch.memory_plan import GIB, estimate
    from megagym.models import read_arch
    from megagym.trainer.policy import Policy

    out = {}
    print(f"{'config':28s}{'max_allocated':>14s}{'plan-runtime':>14s}{'ratio':>8s}")
    for name, par in [("no recompute", {"recompute": "none"}), ("full recompute", {"recompute": "full"})]:
        cfg = cfg_for(hf_dir, 8192, parallel=par, optim={"logprob_chunk_tokens": 2048})
        policy = Policy.build(cfg)
        samples = samples_of([2048] * 4)
        policy.train_step(samples)  # optimizer states exist from here on
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        policy.train_step(samples)
        peak = torch.cuda.max_memory_allocated()
        plan = estimate(read_arch(hf_dir), cfg, 1, kind="gpu", max_sample_tokens=2048)
        planned = plan.total - next(t.bytes for t in plan.terms if t.name.startswith("runtime"))
        out[name] = {"max_allocated": peak, "plan_without_runtime": planned, "plan": plan.table()}
        print(f"{name:28s}{peak / GIB:14.2f}{planned / GIB:14.2f}{planned / peak:8.2f}")
        del policy
        torch.cuda.empty_cache()
    return out


def part_packing(hf_dir: Path) -> dict:
    from train_memory import skewed_lengths

    from megagym.trainer.policy import Policy

    samples = samples_of(skewed_lengths(64), seed=1)
    pol = {k: Policy.build(cfg_for(hf_dir, 8192, optim={"pack_sequences": k == "packed", "logprob_chunk_tokens": 4096}))
           for k in ("padded", "packed")}
    times = {k: [] for k in pol}
    for i in range(4):
        for k, p in pol.items():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            p.train_step(samples)
            torch.cuda.synchronize()
            if i:
                times[k].append(time.perf_counter() - t0)
    tok = sum(len(s.token_ids) - 1 for s in samples)
    r = {k: tok / statistics.median(v) for k, v in times.items()}
    print(f"skewed batch ({tok} tokens): padded {r['padded']:.0f} tokens/s, packed {r['packed']:.0f} tokens/s, "
          f"ratio {r['packed'] / r['padded']:.2f}")
    return r


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("part", choices=["logprobs", "memory", "packing"])
    p.add_argument("--out", default="")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check", file=sys.stderr)
        return 2
    from megagym.trainer import quiet_known_warnings

    quiet_known_warnings()
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = write_model(Path(tmp) / "qwen3_small")
        result = {"logprobs": part_logprobs, "memory": part_memory, "packing": part_packing}[a.part](hf_dir)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / f"gpu_check_{a.part}.json").write_text(json.dumps(result, indent=1))
    from megagym.trainer.parallel import shutdown

    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
