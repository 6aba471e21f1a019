"""Trainer benchmark: Megatron training tokens/s vs a plain transformers + AdamW loop; HF export GB/s.

1. Training throughput on CPU for the tiny Qwen3 (hidden 128, 2 layers, vocab 151,669): the same
   batch (`--samples` sequences of `--seq` tokens, all but a short prompt trained on) through
   - megagym's `Policy.train_step` (Megatron-Core GPTModel, local spec, DDP + distributed
     optimizer, GRPO loss with metrics: entropy, clip fraction, gen-KL; one process, TP=PP=DP=1), and
   - a plain loop: `transformers` Qwen3ForCausalLM forward on the padded batch, log-softmax at the
     targets, the same GRPO token loss, backward, grad clipping, torch AdamW.
   Tokens/s counts every input token of the batch; median over `--steps` after one warm-up step,
   the two loops' steps interleaved so that both see the same machine load.
   `--skewed`: instead, `--samples` sequences with lengths log-uniform in [32, 1024] (the
   length-skewed batch of bench/train_memory.py), megagym with `optim.pack_sequences`, both
   loops cut into micro-batches of `--budget` tokens: megagym packs them (first-fit decreasing),
   the plain loop pads each micro-batch to its longest sample (samples sorted by length, so
   neighbours pad little) and accumulates gradients over them.
2. HF export throughput: `Policy.export_hf()` (full HF-named tensors: QKV de-interleave, gate/up
   split, vocab padding dropped) against a plain `clone()` of every parameter (the same bytes).

    .venv/bin/python bench/train_step.py                 # defaults: 8 x 128 tokens, 5 steps
    .venv/bin/python bench/train_step.py --samples 4 --seq 256 --steps 3 --threads 2
    .venv/bin/python bench/train_step.py --skewed --samples 32 --budget 1024 --steps 3

Prints a table and the ratios (megagym / baseline). Runs in a single process (no torchrun).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from megagym.trainer import quiet_known_warnings  # noqa: E402

quiet_known_warnings()


def make_samples(n: int, seq: int, prompt: int, seed: int = 0, lengths: list[int] | None = None,
                 vocab: int = 151000):
    from megagym.trainer.advantages import assign_advantages
    from megagym.types import Sample

    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n):
        seq_i = lengths[i] if lengths else seq
        ids = torch.randint(0, vocab, (seq_i,), generator=g).tolist()
        mask = [0] * min(prompt, seq_i // 2) + [1] * (seq_i - min(prompt, seq_i // 2))
        gen = [-11.9 if m else 0.0 for m in mask]
        samples.append(Sample(token_ids=ids, loss_mask=mask, gen_logprobs=gen, reward=float(i % 2), group_index=i // 4))
    assign_advantages(samples)
    return samples


def megatron_policy(hf_dir: Path, samples, lr: float, budget: int = 0, pack: bool = False):
    from megagym.config.loader import build
    from megagym.config.schema import RunConfig
    from megagym.trainer.policy import Policy

    tokens = budget or sum(len(s.token_ids) for s in samples)
    cfg = build(RunConfig, {"model": {"hf_path": str(hf_dir)},
                            "optim": {"lr": lr, "micro_batch_tokens": tokens, "clip_grad": 1.0,
                                      "pack_sequences": pack}})
    return Policy.build(cfg)


def bench_export(policy):
    """export_hf (cloning what it yields) vs a plain clone of every parameter: the same bytes."""
    exp_t, copy_t, nbytes = [], [], 0
    params = [p.detach() for p in policy.model.parameters()]
    for _ in range(3):
        t0 = time.perf_counter()
        out = [t.clone() for _, t in policy.export_hf()]  # clone: what a consumer keeping them pays
        exp_t.append(time.perf_counter() - t0)
        nbytes = sum(t.numel() * t.element_size() for t in out)
        del out
        t0 = time.perf_counter()
        copies = [p.clone() for p in params]
        copy_t.append(time.perf_counter() - t0)
        del copies
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    return {"export_s": statistics.median(exp_t), "export_bytes": nbytes, "copy_s": statistics.median(copy_t),
            "param_bytes": param_bytes}


def plain_step_fn(hf_dir: Path, samples, lr: float, temperature: float = 1.0, budget: int = 0):
    """One step of the plain loop as a closure (transformers forward, same GRPO loss, AdamW).

    With `budget`, micro-batches of at most `budget` padded tokens (sorted by length, each padded
    to its longest), gradients accumulated; otherwise the whole (equal-length) batch at once."""
    from transformers import AutoModelForCausalLM

    from megagym.trainer.loss import grpo_token_loss
    from megagym.trainer.step import build_micro_batch, plan_micro_batches

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    token_ids = [s.token_ids for s in samples]
    lengths = [len(t) - 1 for t in token_ids]
    groups = plan_micro_batches(list(range(len(samples))), lengths, budget or sum(lengths))
    mbs = [build_micro_batch(g, token_ids, [s.loss_mask for s in samples], {"gen": [s.gen_logprobs for s in samples]},
                             {"adv": [s.advantage for s in samples]}) for g in groups]
    total = sum(float(mb.mask.sum()) for mb in mbs)

    def step():
        for mb in mbs:
            logits = model(mb.tokens).logits.float()
            if temperature != 1.0:
                logits = logits / temperature
            lp = torch.log_softmax(logits, -1).gather(-1, mb.targets[..., None])[..., 0]
            tl = grpo_token_loss(lp, lp.detach(), mb.extras["gen"], mb.extras["adv"], 0.2, 0.28, 2.0)
            ((tl.loss * mb.mask).sum() / total).backward()
            del logits, lp, tl
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--hf-dir", default="", help="HF checkpoint (default: write the tiny random Qwen3)")
    p.add_argument("--skewed", action="store_true", help="lengths log-uniform in [32, 1024]; megagym packs")
    p.add_argument("--budget", type=int, default=1024, help="--skewed: micro-batch token budget of both loops")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = Path(a.hf_dir) if a.hf_dir else None
        if hf_dir is None:
            from megagym.testing.tiny_qwen3 import write_tiny_qwen3

            hf_dir = write_tiny_qwen3(Path(tmp) / "tiny", seed=0)
        lengths = None
        if a.skewed:
            from train_memory import skewed_lengths

            lengths = skewed_lengths(a.samples, seed=1)
        vocab = min(151000, json.loads((hf_dir / "config.json").read_text())["vocab_size"])
        samples = make_samples(a.samples, a.seq, a.prompt, lengths=lengths, vocab=vocab)
        budget = a.budget if a.skewed else 0
        policy = megatron_policy(hf_dir, samples, a.lr, budget, pack=a.skewed)
        plain_step = plain_step_fn(hf_dir, samples, a.lr, budget=budget)
        meg_t, plain_t = [], []
        for i in range(a.steps + 1):  # interleaved, so both see the same machine load
            t0 = time.perf_counter()
            policy.train_step(samples)
            t1 = time.perf_counter()
            plain_step()
            t2 = time.perf_counter()
            if i:
                meg_t.append(t1 - t0)
                plain_t.append(t2 - t1)
        meg = {"step_s": statistics.median(meg_t), **bench_export(policy)}
        plain = {"step_s": statistics.median(plain_t)}
    tok = sum(len(s.token_ids) for s in samples)
    meg_tps, plain_tps = tok / meg["step_s"], tok / plain["step_s"]
    exp_gbs = meg["export_bytes"] / meg["export_s"] / 1e9
    copy_gbs = meg["param_bytes"] / meg["copy_s"] / 1e9
    shape = (f"{a.samples} samples, lengths log-uniform in [32, 1024], budget {a.budget}, megagym packed"
             if a.skewed else f"{a.samples} x {a.seq} tokens")
    print(f"batch: {shape} ({tok} tokens/step), {a.threads} threads, "
          f"median of {a.steps} interleaved steps after 1 warm-up; load average {os.getloadavg()[0]:.1f}")
    print(f"{'':34s}{'step s':>10s}{'tokens/s':>12s}")
    print(f"{'megagym Policy.train_step':34s}{meg['step_s']:10.3f}{meg_tps:12.0f}")
    print(f"{'plain transformers + AdamW':34s}{plain['step_s']:10.3f}{plain_tps:12.0f}")
    print(f"training ratio (megagym / plain): {meg_tps / plain_tps:.2f}")
    print(f"{'':34s}{'seconds':>10s}{'GB':>8s}{'GB/s':>8s}")
    print(f"{'export_hf (+clone)':34s}{meg['export_s']:10.4f}{meg['export_bytes'] / 1e9:8.3f}{exp_gbs:8.2f}")
    print(f"{'plain clone of the parameters':34s}{meg['copy_s']:10.4f}{meg['param_bytes'] / 1e9:8.3f}{copy_gbs:8.2f}")
    print(f"export ratio (export / plain copy GB/s): {exp_gbs / copy_gbs:.2f}")
    from megagym.trainer.parallel import shutdown

    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
