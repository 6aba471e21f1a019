"""GRPO token-level loss: clipped policy gradient, truncated importance sampling, optional KL.

Owns: the per-token loss and the per-token statistics the step aggregates into metrics. Pure
torch (no megatron): tested on its own. Normalisation is NOT done here: the step divides the sum
over valid tokens by the number of valid tokens of the global batch (all micro-batches, all DP
ranks), so every token weighs the same however the batch was cut.

Quantities per generated token t (all logprobs of the temperature-scaled distribution):
  logp     trainer logprob under the current weights (differentiable)
  old      trainer logprob before this optimizer step (no grad; = logp.detach() on-policy)
  gen      logprob reported by the generation engine
  ratio = exp(logp - old); pg = max(-A*ratio, -A*clip(ratio, 1-clip_low, 1+clip_high))
  TIS:  pg *= min(exp(old - gen), tis_threshold)   (corrects the engine/trainer mismatch)
  KL:   + kl_coef * k3(ref, logp), k3 = exp(ref-logp) - (ref-logp) - 1
Must not: know about batches, padding layout or parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass

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
