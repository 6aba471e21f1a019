"""torchrun worker: GRPO train steps at several layouts vs a plain transformers + torch reference,
then save / resume at TP2xPP2 and the trained model's logits for the convert test.

argv: HF_DIR OUT_DIR. 4 ranks. Rank 0 writes OUT_DIR/train.json, OUT_DIR/ckpt (a checkpoint after
step 2 at TP2xPP2) and OUT_DIR/trained_logits.pt (full logits of that checkpoint's model).
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import make_cfg  # noqa: E402

from megagym.trainer import head  # noqa: E402
from megagym.trainer.advantages import assign_advantages  # noqa: E402
from megagym.trainer.loss import grpo_token_loss  # noqa: E402
from megagym.trainer.policy import Policy  # noqa: E402
from megagym.trainer.step import build_micro_batch, run_schedule  # noqa: E402
from megagym.types import Sample  # noqa: E402

hf_dir, out_dir = sys.argv[1], Path(sys.argv[2])
rank = int(__import__("os").environ["RANK"])
TEMP, LR, WARMUP = 0.8, 2e-2, 2
SECTIONS = dict(optim={"lr": LR, "warmup_steps": WARMUP, "total_steps": 10, "clip_grad": 1.0,
                       "micro_batch_tokens": 40},
                grpo={"temperature": TEMP, "clip_low": 0.2, "clip_high": 0.28, "tis_threshold": 1.5})


def make_samples():
    g = torch.Generator().manual_seed(1)
    out = []
    for i, (prompt, gen) in enumerate([(5, 6), (4, 12), (7, 3), (3, 15), (6, 8), (2, 4)]):
        ids = torch.randint(0, 151000, (prompt + gen,), generator=g).tolist()
        mask = [0] * prompt + [1] * gen
        noise = (torch.randn(prompt + gen, generator=g) * 0.3).tolist()
        out.append(Sample(token_ids=ids, loss_mask=mask, gen_logprobs=[0.0] * len(ids),
                          reward=[1.0, 0.0, 0.5, 1.0, 0.0, 0.2][i], group_index=i // 3))
        out[-1]._noise = noise
    assign_advantages(out, normalize_std=True)
    return out


def with_gen_logprobs(samples, lps):
    """Generation logprobs = trainer logprobs + noise on generated tokens (an engine mismatch)."""
    for s, lp in zip(samples, lps):
        s.gen_logprobs = [float(lp[t]) + s._noise[t] if s.loss_mask[t] else 0.0 for t in range(len(s.token_ids))]
    return samples


def reference(samples, old, steps):
    """Plain transformers + torch.optim.AdamW with the same loss; returns metrics and final weights."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    m.train()
    opt = torch.optim.AdamW(m.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    total = sum(sum(s.loss_mask[1:]) for s in samples)
    hist = []
    for step in range(1, steps + 1):
        for grp in opt.param_groups:
            grp["lr"] = LR * min(1.0, step / WARMUP)
        loss = 0.0
        for s, o in zip(samples, old):
            ids = torch.tensor([s.token_ids])
            logits = m(ids).logits[0, :-1].float() / TEMP
            lp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
            mask = torch.tensor(s.loss_mask[1:], dtype=torch.float)
            tl = grpo_token_loss(lp, o[1:], torch.tensor(s.gen_logprobs[1:]), torch.full_like(lp, s.advantage),
                                 0.2, 0.28, 1.5)
            loss = loss + (tl.loss * mask).sum() / total
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        hist.append({"loss": float(loss), "grad_norm": float(gn)})
    return hist, {k: v.detach().clone() for k, v in m.state_dict().items()}


def full_logits(policy, seqs):
    mbs = [build_micro_batch(list(range(len(seqs))), seqs, [[1] * len(s) for s in seqs], {}, {})]
    got = {}

    def collect(hidden, mb):
        full = head.full_logits(head.unwrap(policy.model), hidden, policy.arch.vocab_size)
        for row, sid in enumerate(mb.sample_ids):
            got[sid] = full[row, : len(seqs[sid]) - 1].clone()
        return hidden.new_zeros(()), torch.zeros((), dtype=torch.int)

    run_schedule(policy.model, mbs, collect, forward_only=True)
    box = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(got if policy._reports() else {}, box, dst=0)
    if rank == 0:
        merged = {}
        for part in box:
            merged.update(part)
        return [merged[i] for i in range(len(seqs))]


def exported(policy):
    return {k: v.clone() for k, v in policy.export_hf()}


results = {"layouts": {}}
samples = make_samples()
ref = None
for name, tp, pp in [("dp4", 1, 1), ("tp2dp2", 2, 1), ("pp2dp2", 1, 2), ("tp2pp2", 2, 2)]:
    policy = Policy.build(make_cfg(hf_dir, tp, pp, **SECTIONS))
    old = policy.compute_logprobs(samples if rank == 0 else None)  # no-grad pass over the same samples
    if rank == 0:
        with_gen_logprobs(samples, old)
    m1 = policy.train_step(samples if rank == 0 else None, old_logprobs=old if rank == 0 else None)
    m2 = policy.train_step(samples if rank == 0 else None, old_logprobs=old if rank == 0 else None)
    weights = exported(policy)
    if rank == 0:
        if ref is None:
            ref = reference(samples, old, 2)
        hist, ref_w = ref
        wdiff = max(float((weights[k] - ref_w[k]).abs().max()) for k in weights)
        results["layouts"][name] = {"metrics": [m1, m2], "ref": hist, "weight_diff": wdiff,
                                    "old_len_ok": all(len(o) == len(s.token_ids) for o, s in zip(old, samples))}
    if name != "tp2pp2":
        del policy
        dist.barrier()

# --- checkpoint + resume at TP2xPP2: the next-step loss after loading equals the uninterrupted run's
ckpt = out_dir / "ckpt"
policy.save(ckpt, extra_state={"data_position": 12, "epoch": 0})
seqs = [s.token_ids for s in samples[:3]]
logits_at_ckpt = full_logits(policy, seqs)
m3 = policy.train_step(samples if rank == 0 else None, old_logprobs=old if rank == 0 else None)
w3 = exported(policy)
del policy
dist.barrier()
policy = Policy.build(make_cfg(hf_dir, 2, 2, **SECTIONS))
extra = policy.load(ckpt)
m3b = policy.train_step(samples if rank == 0 else None, old_logprobs=old if rank == 0 else None)
w3b = exported(policy)
if rank == 0:
    results["resume"] = {
        "extra_state": extra, "step_after": m3b["step"], "loss": [m3["loss"], m3b["loss"]],
        "grad_norm": [m3["grad_norm"], m3b["grad_norm"]], "lr": [m3["lr"], m3b["lr"]],
        "weights_equal": all(torch.equal(w3[k], w3b[k]) for k in w3),
        "weights_max_diff": max(float((w3[k] - w3b[k]).abs().max()) for k in w3),
        "weights_diff_names": sorted(k for k in w3 if not torch.equal(w3[k], w3b[k]))[:5],
    }
    torch.save({"seqs": seqs, "logits": logits_at_ckpt}, out_dir / "trained_logits.pt")

# --- KL to the reference model at TP2xPP2 (kl_coef 0.1): train_step computes the reference
# logprobs itself from a frozen copy of the initial weights
del policy
dist.barrier()
KL_COEF = 0.1
policy = Policy.build(make_cfg(hf_dir, 2, 2, optim=SECTIONS["optim"], grpo=dict(SECTIONS["grpo"], kl_coef=KL_COEF)))
ref0 = policy.compute_ref_logprobs(samples if rank == 0 else None)
cur0 = policy.compute_logprobs(samples if rank == 0 else None)
k1 = policy.train_step(samples if rank == 0 else None, old_logprobs=old if rank == 0 else None)
k2 = policy.train_step(samples if rank == 0 else None, old_logprobs=old if rank == 0 else None)
ref2 = policy.compute_ref_logprobs(samples if rank == 0 else None)
cur2 = policy.compute_logprobs(samples if rank == 0 else None)
if rank == 0:
    results["kl"] = {
        "coef": KL_COEF, "metrics": [k1, k2],
        "ref_vs_policy_at_start": max(float((a - b).abs().max()) for a, b in zip(ref0, cur0)),
        "ref_moved": max(float((a - b).abs().max()) for a, b in zip(ref0, ref2)),
        "policy_moved": max(float((a - b).abs().max()) for a, b in zip(cur0, cur2)),
    }
    (out_dir / "train.json").write_text(json.dumps(results, indent=1))
dist.barrier()
dist.destroy_process_group()
