"""Trainer memory benchmark (CPU): measured peak memory of one train step against the memory plan,
activation recomputation's saving, and packed vs padded throughput on a length-skewed batch.

1. Recomputation: one `Policy.train_step` (GRPO loss, Megatron DDP + distributed optimizer, one
   process) on model A24 with `parallel.recompute: none` and `full`; the peak RSS of the step
   (VmHWM, reset through /proc/self/clear_refs just before the step, so model loading does not
   count) and the loss of each. The bar: full <= 0.4x none, same loss.
2. Estimator: `megagym.launch.memory_plan.estimate(kind="cpu")` for each measured config against
   its measured peak (bar: within +-25%). Its CPU runtime constant was fitted on model A8's peaks;
   `LOCAL_SPEC_KEEPS` was counted with autograd's saved-tensor hooks (bytes kept, not peaks) on
   A8, A24 and B (`--part kept` prints that count for A24 - A8). No other model's peak set a constant.
3. Packing: the same length-skewed batch (lengths log-uniform in [32, 1024]) through
   `Policy.train_step` in three layouts, steps interleaved in one process so all see the same
   machine load; tokens/s counts real tokens. Packed (`optim.pack_sequences`: first-fit
   decreasing, each sample attended alone), megagym's padded default (sorted by length, so
   neighbours pad little) and, as the baseline, a fixed number of rows per micro-batch in the
   batch's own order, each padded to its micro-batch's longest (a trainer without length grouping).
   On two depths of one width (A8, A24): the head, which only trained tokens reach in every
   layout, is 25% and 10% of their matmul weights (Qwen3-4B: 10%), and packing cannot shrink it.

Every measurement runs in its own child process, one at a time (the parent holds no model).
Models are small random Qwen3s written to a temp dir (MODELS: 8 and 24 layers of width 256 with
an 8k vocabulary, 4 layers of width 512 with a 49k vocabulary; 4-60M parameters), fp32,
micro-batches of 2,048 tokens: every child stays under ~4 GiB.

    .venv/bin/python bench/train_memory.py                  # all four parts, ~10 min on 2 cores
    .venv/bin/python bench/train_memory.py --part memory    # or: packing, kept
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODELS = {  # write_tiny_qwen3 overrides
    "A8": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=8, num_attention_heads=4,
               num_key_value_heads=2, head_dim=64, vocab_size=8192, tie_word_embeddings=True),
    "A24": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=24, num_attention_heads=4,
                num_key_value_heads=2, head_dim=64, vocab_size=8192, tie_word_embeddings=True),
    "B": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=4, head_dim=64, vocab_size=49152, tie_word_embeddings=False),
}
BUDGET = 2048
# (model, parallel overrides, optim overrides, rows x row length). A24 (3x deeper), B (another
# width, untied, whole-micro-batch logits) and the packed run (two samples in one row, attended
# sample by sample: no scores kept) check the plan on peaks no constant was fitted to.
MEMORY_RUNS = [
    ("A8", {"recompute": "none"}, {"logprob_chunk_tokens": 512}, (2, 1024)),
    ("A8", {"recompute": "full"}, {"logprob_chunk_tokens": 512}, (2, 1024)),
    ("A24", {"recompute": "none"}, {"logprob_chunk_tokens": 512}, (2, 1024)),
    ("A24", {"recompute": "full"}, {"logprob_chunk_tokens": 512}, (2, 1024)),
    ("A24", {"recompute": "selective"}, {"logprob_chunk_tokens": 512}, (2, 1024)),
    ("B", {"recompute": "none"}, {"logprob_chunk_tokens": 0}, (4, 512)),
    ("B", {"recompute": "full"}, {"logprob_chunk_tokens": 512}, (4, 512)),
    ("A24", {"recompute": "none"}, {"logprob_chunk_tokens": 512, "pack_sequences": True}, (2, 1024)),
]


def _quiet():
    from megagym.trainer import quiet_known_warnings

    quiet_known_warnings()


def make_samples(lengths: list[int], seed: int = 0):
    import torch

    from megagym.trainer.advantages import assign_advantages
    from megagym.types import Sample

    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lengths):
        prompt = min(16, n // 2)
        ids = torch.randint(0, 8000, (n,), generator=g).tolist()  # below every model's vocabulary
        mask = [0] * prompt + [1] * (n - prompt)
        out.append(Sample(token_ids=ids, loss_mask=mask, gen_logprobs=[-10.4 if m else 0.0 for m in mask],
                          reward=float(i % 2), group_index=i // 4))
    assign_advantages(out)
    return out


def skewed_lengths(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [int(round(math.exp(rng.uniform(math.log(32), math.log(1024))))) for _ in range(n)]


def build_cfg(hf_dir: str, parallel: dict, optim: dict):
    from megagym.config.loader import build
    from megagym.config.schema import RunConfig

    return build(RunConfig, {"model": {"hf_path": hf_dir}, "parallel": parallel,
                             "optim": {"lr": 1e-4, "micro_batch_tokens": BUDGET, "clip_grad": 1.0, **optim}})


def _vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def child_memory(spec: dict) -> dict:
    import torch

    from megagym.trainer.policy import Policy

    torch.set_num_threads(2)
    policy = Policy.build(build_cfg(spec["hf"], spec["parallel"], spec["optim"]))
    rows, length = spec["shape"]
    samples = make_samples([length + 1] * rows)  # length + 1 tokens = `length` input positions
    before = _vm("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    m = policy.train_step(samples)
    return {"peak": _vm("VmHWM"), "before": before, "loss": m["loss"]}


def child_kept(spec: dict) -> dict:
    """Bytes autograd keeps for backward in one train step (each storage once), no RSS involved."""
    import torch

    from megagym.trainer.policy import Policy

    torch.set_num_threads(2)
    policy = Policy.build(build_cfg(spec["hf"], {"recompute": "none"},
                                    {"logprob_chunk_tokens": 512, "pack_sequences": spec["packed"]}))
    kept: dict[int, int] = {}

    def keep(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    rows, length = spec["shape"]
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        policy.train_step(make_samples([length + 1] * rows))
    return {"kept": sum(kept.values())}


def fixed_rows_plan(ids: list[int], lengths: list[int], budget: int) -> list[list[int]]:
    """Baseline only: a fixed number of samples per micro-batch (as many of the batch's longest as
    the budget holds), in the batch's own order, each row padded to its micro-batch's longest: the
    layout of a trainer without length grouping or packing (a fixed micro-batch size and a
    collator padding to the longest, as transformers' Trainer does)."""
    rows = max(1, budget // max(lengths[i] for i in ids))
    return [ids[k:k + rows] for k in range(0, len(ids), rows)]


LAYOUTS = ("padded, fixed rows", "padded, sorted", "packed")
# The packing part's models. Only trained tokens reach the vocabulary projection, in every layout,
# so the head's share of a step is a cost packing cannot shrink, and the gain depends on it. A8's
# head is 25% of its matmul weights; A24's 10%, as in the models megagym trains (Qwen3-4B: 3.6B
# parameters in the layers, 0.4B in the head). The 2-layer tiny Qwen3 (hidden 128, 152k vocabulary)
# spends ~90% of a step on the head: no layout could change its step time.
PACKING_MODELS = ("A8", "A24")


def head_share(m: dict) -> float:
    """The output layer's share of the matmul weights a trained token goes through."""
    h, d = m["hidden_size"], m["head_dim"]
    attn = h * d * (2 * m["num_attention_heads"] + 2 * m["num_key_value_heads"])
    layers = m["num_hidden_layers"] * (attn + 3 * h * m["intermediate_size"])
    return h * m["vocab_size"] / (layers + h * m["vocab_size"])


def child_packing(spec: dict) -> dict:
    import torch

    import megagym.trainer.policy as policy_module
    from megagym.trainer.packing import pack_bins
    from megagym.trainer.policy import Policy
    from megagym.trainer.step import plan_micro_batches

    torch.set_num_threads(2)
    samples = make_samples(skewed_lengths(spec["n"]), seed=1)
    pol = {k: Policy.build(build_cfg(spec["hf"], {}, {"pack_sequences": k == "packed", "logprob_chunk_tokens": 512}))
           for k in LAYOUTS}
    plans = {"padded, fixed rows": fixed_rows_plan, "padded, sorted": plan_micro_batches, "packed": pack_bins}
    times: dict[str, list[float]] = {k: [] for k in pol}
    losses = {}
    for i in range(spec["steps"] + 1):
        for k, p in pol.items():
            policy_module.plan_micro_batches = fixed_rows_plan if k == LAYOUTS[0] else plan_micro_batches
            t0 = time.perf_counter()
            losses[k] = p.train_step(samples)["loss"]
            if i:
                times[k].append(time.perf_counter() - t0)
    policy_module.plan_micro_batches = plan_micro_batches

    lengths = [len(s.token_ids) - 1 for s in samples]
    ids = list(range(len(samples)))
    slots = {k: sum(len(g) * max(lengths[i] for i in g) for g in plans[k](ids, lengths, BUDGET)) for k in LAYOUTS[:2]}
    slots["packed"] = sum(lengths)  # rows hold samples back to back
    return {"tokens": sum(lengths), "slots": slots,
            "micro_batches": {k: len(plans[k](ids, lengths, BUDGET)) for k in LAYOUTS},
            "step_s": {k: statistics.median(v) for k, v in times.items()}, "loss": losses}


def run_child(kind: str, spec: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, __file__, "--child", kind, json.dumps(spec)], env=env,
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"child {kind} {spec} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def part_memory(dirs: dict) -> None:
    from megagym.launch.memory_plan import GIB, estimate
    from megagym.models import read_arch

    print(f"one train step, peak RSS of the step (GiB); micro-batch budget {BUDGET} tokens, fp32, local spec")
    print(f"{'model':6s}{'recompute':11s}{'chunk':>6s}{'samples x len':>14s}{'packed':>7s}{'measured':>10s}{'plan':>8s}"
          f"{'plan/meas':>10s}{'loss':>14s}")
    measured = {}
    for model, par, opt, shape in MEMORY_RUNS:
        r = run_child("memory", {"hf": str(dirs[model]), "parallel": par, "optim": opt, "shape": shape})
        cfg = build_cfg(str(dirs[model]), par, opt)
        plan = estimate(read_arch(dirs[model]), cfg, nproc=1, kind="cpu", max_sample_tokens=shape[1])
        packed = bool(opt.get("pack_sequences"))
        measured[(model, par["recompute"], packed)] = r
        print(f"{model:6s}{par['recompute']:11s}{opt['logprob_chunk_tokens']:6d}{f'{shape[0]} x {shape[1]}':>14s}"
              f"{'yes' if packed else 'no':>7s}"
              f"{r['peak'] / GIB:10.2f}{plan.total / GIB:8.2f}{plan.total / r['peak']:10.2f}{r['loss']:14.8f}")
    none, full = measured[("A24", "none", False)], measured[("A24", "full", False)]
    print(f"full / no recompute peak RSS (model A24): {full['peak'] / none['peak']:.2f}; "
          f"loss difference {abs(full['loss'] - none['loss']):.2e}")


def part_kept(dirs: dict) -> None:
    """Where LOCAL_SPEC_KEEPS comes from: per token and layer, what the local spec keeps against the
    fused formula (weights and head excluded by differencing two depths: A24 - A8, same width)."""
    from megagym.launch.memory_plan import LOCAL_SPEC_KEEPS, layer_activation_bytes
    from megagym.models import read_arch

    arch = read_arch(dirs["A8"])
    tokens = 2048
    formula = layer_activation_bytes(arch, tokens, 1024, 1, False, 4, "flash", False) / tokens
    print(f"bytes kept for backward per token and layer (A24 - A8, 16 layers x {tokens} tokens, width 256); "
          f"fused formula {formula:.0f} B; LOCAL_SPEC_KEEPS = {LOCAL_SPEC_KEEPS}")
    print(f"{'rows':22s}{'kept B':>10s}{'/ formula':>11s}")
    for packed in (True, False):
        spec = {"packed": packed, "shape": (2, 1024)}
        kept = {m: run_child("kept", {"hf": str(dirs[m]), **spec})["kept"] for m in ("A8", "A24")}
        per = (kept["A24"] - kept["A8"]) / (16 * tokens)
        label = "packed (no scores)" if packed else "padded 2 x 1024"
        print(f"{label:22s}{per:10.0f}{per / formula:11.2f}")


def part_packing(dirs: dict, n: int, steps: int) -> None:
    for model in PACKING_MODELS:
        r = run_child("packing", {"hf": str(dirs[model]), "n": n, "steps": steps})
        tok = r["tokens"]
        m = MODELS[model]
        print(f"model {model} ({m['num_hidden_layers']} layers of width {m['hidden_size']}; "
              f"head {100 * head_share(m):.0f}% of the matmul weights); length-skewed batch: {n} samples, lengths log-uniform in [32, 1024], {tok} tokens; "
              f"budget {BUDGET}; median of {steps} interleaved steps; load average {os.getloadavg()[0]:.1f}")
        print(f"{'':30s}{'micro-batches':>14s}{'padding':>9s}{'step s':>9s}{'tokens/s':>10s}{'vs packed':>10s}"
              f"{'loss':>14s}")
        for k in LAYOUTS:
            print(f"{'megagym ' + k:30s}{r['micro_batches'][k]:14d}{100 * (r['slots'][k] / tok - 1):8.0f}%"
                  f"{r['step_s'][k]:9.3f}{tok / r['step_s'][k]:10.0f}{r['step_s']['packed'] / r['step_s'][k]:10.2f}"
                  f"{r['loss'][k]:14.8f}")
        for k in LAYOUTS[:2]:
            print(f"{model}: packed / {k} tokens/s: {r['step_s'][k] / r['step_s']['packed']:.2f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["all", "memory", "packing", "kept"], default="all")
    p.add_argument("--samples", type=int, default=24, help="packing: samples in the skewed batch")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    _quiet()
    if a.child:
        fn = {"memory": child_memory, "packing": child_packing, "kept": child_kept}[a.child[0]]
        print(json.dumps(fn(json.loads(a.child[1]))))
        return 0
    from megagym.testing.tiny_qwen3 import write_tiny_qwen3

    with tempfile.TemporaryDirectory() as tmp:
        dirs = {k: write_tiny_qwen3(Path(tmp) / k, seed=0, **v) for k, v in MODELS.items()}
        if a.part in ("all", "memory"):
            part_memory(dirs)
        if a.part in ("all", "kept"):
            part_kept(dirs)
        if a.part in ("all", "packing"):
            part_packing(dirs, a.samples, a.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
