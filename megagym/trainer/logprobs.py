"""Logprobs of sampled tokens from vocab-parallel logits: the trainer side of the logprob contract.

Contract with the policy server: the engine reports logprobs of the temperature-scaled
distribution, so the trainer computes `log_softmax(logits / temperature)` at the sampled tokens,
in float32, over the true vocabulary (Megatron's padding columns are excluded). `token_logprobs`
is the one function that does this; it is TP-aware (each rank holds a vocab slice) and
differentiable. Must not: know about losses, batches or models.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_NEG = -1e30  # logit of padding vocab columns: exp() underflows to exactly 0, no NaN in p*log(p)


def _tp():
    from megatron.core import parallel_state

    return (parallel_state.get_tensor_model_parallel_group(), parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_world_size())


def scaled_logits(logits: torch.Tensor, temperature: float, true_vocab: int) -> torch.Tensor:
    """float32 logits / temperature with this rank's padding columns (>= true_vocab) masked out."""
    _, rank, _ = _tp()
    local = logits.shape[-1]
    start = rank * local
    x = logits.float()
    if temperature != 1.0:
        x = x / temperature
    if start + local > true_vocab:
        cols = torch.arange(start, start + local, device=x.device) >= true_vocab
        x = x.masked_fill(cols, _NEG)
    return x


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float, true_vocab: int) -> torch.Tensor:
    """log_softmax(logits / temperature)[targets] for vocab-parallel `logits` [..., V/tp]; differentiable."""
    from megatron.core import tensor_parallel

    x = scaled_logits(logits, temperature, true_vocab)
    return -tensor_parallel.vocab_parallel_cross_entropy(x, targets)


@torch.no_grad()
def entropy(logits: torch.Tensor, temperature: float, true_vocab: int) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) per position, for vocab-parallel logits (no grad)."""
    group, _, size = _tp()
    x = scaled_logits(logits, temperature, true_vocab)
    mx = x.max(dim=-1, keepdim=True).values
    if size > 1:
        dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=group)
    e = torch.exp(x - mx)
    sums = torch.stack([e.sum(-1), (e * (x - mx)).sum(-1)])
    if size > 1:
        dist.all_reduce(sums, group=group)
    z, ex = sums[0], sums[1]
    return torch.log(z) - ex / z


@torch.no_grad()
def gather_full_logits(logits: torch.Tensor, true_vocab: int) -> torch.Tensor:
    """All vocab columns on every TP rank, padding removed (tests and debugging only)."""
    group, _, size = _tp()
    if size > 1:
        parts = [torch.empty_like(logits) for _ in range(size)]
        dist.all_gather(parts, logits.contiguous(), group=group)
        logits = torch.cat(parts, dim=-1)
    return logits[..., :true_vocab]
