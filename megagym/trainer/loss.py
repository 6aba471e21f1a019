"""GRPO token-level loss: clipped policy gradient, truncated importance sampling, optional KL.

Owns: the per-token loss (`grpo_token_loss`, pure torch: tested on its own), the loss function
the Megatron schedule calls on each micro-batch's logits (`grpo_loss_fn`: logprobs at the GRPO
temperature, the token loss summed over valid tokens) and its metric sums with named fields
(`StepSums`). Normalisation is NOT done per micro-batch: Megatron divides the sum over valid
tokens by the number of valid tokens of the global batch (all micro-batches, all DP ranks), so
every token weighs the same however the batch was cut.

Quantities per generated token t (all logprobs of the temperature-scaled distribution):
  logp     trainer logprob under the current weights (differentiable)
  old      trainer logprob before this optimizer step (no grad; = logp.detach() on-policy)
  gen      logprob reported by the generation engine
  ratio = exp(logp - old); pg = max(-A*ratio, -A*clip(ratio, 1-clip_low, 1+clip_high))
  TIS:  pg *= min(exp(old - gen), tis_threshold)   (corrects the engine/trainer mismatch)
  KL:   + kl_coef * k3(ref, logp), k3 = exp(ref-logp) - (ref-logp) - 1
Must not: cut batches, know the padding layout beyond `MicroBatch.mask`, or reduce across ranks
(the policy all-reduces `StepSums`).
"""

from __future__ import annotations

from dataclasses import astuple, dataclass, fields

import torch


@dataclass
class TokenLoss:
    loss: torch.Tensor        # per-token loss (differentiable)
    clipped: torch.Tensor     # 1.0 where the clip was active
    gen_abs_diff: torch.Tensor  # |old - gen|
    gen_k3: torch.Tensor      # k3 estimate of KL(gen || trainer) per token
    is_weight: torch.Tensor   # truncated importance weight (1 without TIS)


def k3(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(q || p) from samples of q: exp(p - q) - (p - q) - 1 (>= 0)."""
    d = log_p - log_q
    return torch.exp(d) - d - 1.0


def grpo_token_loss(logp: torch.Tensor, old: torch.Tensor, gen: torch.Tensor, advantages: torch.Tensor,
                    clip_low: float = 0.2, clip_high: float = 0.28, tis_threshold: float | None = 2.0,
                    kl_coef: float = 0.0, ref: torch.Tensor | None = None) -> TokenLoss:
    old = old.detach()
    gen = gen.detach()
    ratio = torch.exp(logp - old)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg = torch.maximum(unclipped, clipped)
    if tis_threshold is not None:
        weight = torch.clamp(torch.exp(old - gen), max=tis_threshold)
    else:
        weight = torch.ones_like(old)
    loss = pg * weight
    if kl_coef > 0:
        if ref is None:
            raise ValueError("kl_coef > 0 needs reference logprobs")
        loss = loss + kl_coef * k3(ref.detach(), logp)
    return TokenLoss(
        loss=loss,
        clipped=(clipped > unclipped).float().detach(),
        gen_abs_diff=(old - gen).abs(),
        gen_k3=k3(old, gen),
        is_weight=weight,
    )


@dataclass
class StepSums:
    """Sums over the valid tokens of one optimizer step (reporting ranks add, the policy all-reduces)."""

    loss: float = 0.0
    tokens: float = 0.0
    clipped: float = 0.0
    entropy: float = 0.0
    gen_abs_diff: float = 0.0
    gen_k3: float = 0.0
    is_weight: float = 0.0
    kl: float = 0.0

    def add(self, **sums: torch.Tensor) -> None:
        for name, value in sums.items():
            setattr(self, name, getattr(self, name) + float(value.detach().sum()))

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor(astuple(self), dtype=torch.float64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "StepSums":
        return cls(*(float(x) for x in t.cpu()))

    def means(self) -> dict[str, float]:
        """Per-token means (and the token count) as the step's metrics."""
        tok = max(self.tokens, 1.0)
        out = {f.name: getattr(self, f.name) / tok for f in fields(self) if f.name not in ("tokens", "clipped")}
        out.update(tokens=self.tokens, clip_fraction=self.clipped / tok)
        return out


def grpo_loss_fn(grpo, vocab: int, device, sums: StepSums | None, weight: torch.Tensor, chunk_tokens: int):
    """`loss_fn(hidden, mb) -> (loss summed over mb's valid tokens, valid token count)` for
    `step.run_schedule`; with `sums` it also adds the step's metric sums (reporting ranks only).

    `hidden` are the last stage's final hidden states (the output layer is deferred, see head.py):
    only trained tokens go through the vocabulary projection, `chunk_tokens` at a time (prompt and
    padding positions are masked out of the loss and every metric).
    `mb.extras`: "gen" (generation logprobs), "adv" (advantages), optional "old" (before-step
    logprobs; on-policy they are this forward's, detached) and "ref" (reference logprobs, for KL)."""
    from megagym.trainer.logprobs import token_logprobs_and_entropy
    from megagym.trainer.step import to_device

    def loss_fn(hidden, mb):
        mb = to_device(mb, device)
        x = mb.extras
        logp, ent = token_logprobs_and_entropy(hidden, weight, mb.targets, grpo.temperature, vocab, chunk_tokens,
                                               where=mb.mask > 0)
        old = x["old"] if "old" in x else logp.detach()
        tl = grpo_token_loss(logp, old, x["gen"], x["adv"], grpo.clip_low, grpo.clip_high, grpo.tis_threshold,
                             grpo.kl_coef, x.get("ref"))
        m = mb.mask
        loss = (tl.loss * m).sum()
        if sums is not None:
            with torch.no_grad():
                kl = k3(x["ref"], logp) * m if "ref" in x else m.new_zeros(())
                sums.add(loss=loss, tokens=m, clipped=tl.clipped * m, entropy=ent * m,
                         gen_abs_diff=tl.gen_abs_diff * m, gen_k3=tl.gen_k3 * m, is_weight=tl.is_weight * m, kl=kl)
        return loss, m.sum().int()

    return loss_fn
