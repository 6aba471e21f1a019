"""Logprobs of sampled tokens from vocab-parallel logits: the trainer side of the logprob contract.

Contract with the policy server: the engine reports logprobs of the temperature-scaled
distribution, so the trainer computes `log_softmax(logits / temperature)` at the sampled tokens,
in float32, over the true vocabulary (Megatron's padding columns are excluded). `token_logprobs`
is the one function that does this; it is TP-aware (each rank holds a vocab slice) and
differentiable (a fused autograd function that also yields the entropy from the same softmax). Must not: know about losses, batches or models.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_NEG = -1e30  # logit of padding vocab columns: exp() underflows to exactly 0, no NaN in p*log(p)


def _tp():
    from megatron.core import parallel_state

    return (parallel_state.get_tensor_model_parallel_group(), parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_world_size())


class _VocabParallelLogprob(torch.autograd.Function):
    """log_softmax(logits / T)[target] (differentiable) and the entropy (not) in one pass over the vocab.

    Saves only the softmax for backward: d logp / d logits = (onehot(target) - softmax) / T.
    """

    @staticmethod
    def forward(ctx, logits, targets, temperature, true_vocab, want_entropy):
        group, rank, size = _tp()
        x = logits.float()
        if temperature != 1.0:
            x = x / temperature
        local = x.shape[-1]
        start = rank * local
        valid = min(max(true_vocab - start, 0), local)  # this rank's real (non-padding) columns
        if valid:
            mx = x[..., :valid].max(dim=-1, keepdim=True).values
        else:
            mx = x.new_full((*x.shape[:-1], 1), _NEG)
        if size > 1:
            dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=group)
        x = x - mx  # a new tensor: the caller's logits stay untouched, no separate copy
        if valid < local:
            x[..., valid:] = _NEG
        in_range = (targets >= start) & (targets < start + local)
        local_t = torch.where(in_range, targets - start, torch.zeros_like(targets))
        picked = x.gather(-1, local_t.unsqueeze(-1)).squeeze(-1) * in_range
        e = torch.exp(x)
        stats = [picked, e.sum(-1)]
        if want_entropy:
            stats.append(torch.linalg.vecdot(e, x))  # sum(e * (x - max)) without a temporary
        del x
        stats = torch.stack(stats)
        if size > 1:
            dist.all_reduce(stats, group=group)
        log_z = torch.log(stats[1])
        logp = stats[0] - log_z
        ent = log_z - stats[2] / stats[1] if want_entropy else torch.zeros_like(logp)
        e.div_(stats[1].unsqueeze(-1))  # softmax
        ctx.save_for_backward(e, local_t, in_range)
        ctx.temperature = temperature
        ctx.in_dtype = logits.dtype
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, _grad_ent):
        softmax, local_t, in_range = ctx.saved_tensors
        g = grad_logp.float()
        grad = softmax.mul_(-g.unsqueeze(-1))
        grad.scatter_add_(-1, local_t.unsqueeze(-1), (g * in_range).unsqueeze(-1))
        if ctx.temperature != 1.0:
            grad.div_(ctx.temperature)
        return grad.to(ctx.in_dtype), None, None, None, None


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float, true_vocab: int) -> torch.Tensor:
    """log_softmax(logits / temperature)[targets] for vocab-parallel `logits` [..., V/tp]; differentiable."""
    return _VocabParallelLogprob.apply(logits, targets, temperature, true_vocab, False)[0]


def token_logprobs_and_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float,
                               true_vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_logprobs` plus the entropy of softmax(logits / temperature) per position (no grad)."""
    return _VocabParallelLogprob.apply(logits, targets, temperature, true_vocab, True)


@torch.no_grad()
def entropy(logits: torch.Tensor, temperature: float, true_vocab: int) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) per position, for vocab-parallel logits (no grad)."""
    targets = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return _VocabParallelLogprob.apply(logits, targets, temperature, true_vocab, True)[1]


@torch.no_grad()
def gather_full_logits(logits: torch.Tensor, true_vocab: int) -> torch.Tensor:
    """All vocab columns on every TP rank, padding removed (tests and debugging only)."""
    group, _, size = _tp()
    if size > 1:
        parts = [torch.empty_like(logits) for _ in range(size)]
        dist.all_gather(parts, logits.contiguous(), group=group)
        logits = torch.cat(parts, dim=-1)
    return logits[..., :true_vocab]
