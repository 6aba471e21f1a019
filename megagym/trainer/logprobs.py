"""Logprobs of sampled tokens from the output layer: the trainer side of the logprob contract.

Contract with the policy server: the engine reports logprobs of the temperature-scaled
distribution, so the trainer computes `log_softmax(logits / temperature)` at the sampled tokens,
in float32, over the true vocabulary (Megatron's padding columns are excluded). `token_logprobs`
is the one function that does this. It takes the final hidden states and this rank's slice of
the vocab-parallel output weight (not the logits) and forms the logits `chunk_tokens` positions
at a time, so the full `tokens x vocab` float32 logits never exist: each chunk's max and
softmax sums are reduced over the TP ranks, and the backward recomputes each chunk's logits from
the saved hidden states and the per-token log-normaliser. With one chunk (`chunk_tokens` 0 or at
least the token count) it keeps that chunk's softmax for the backward instead, like an
unchunked output layer. The entropy comes from the same pass (no grad).
Must not: know about losses, batches or models (`head.py` hands it the hidden states and weight).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_NEG = -1e30  # logit of padding vocab columns: exp() underflows to exactly 0, no NaN in p*log(p)


def _tp():
    from megatron.core import parallel_state

    return (parallel_state.get_tensor_model_parallel_group(), parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_world_size())


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, temperature: float, valid: int) -> torch.Tensor:
    """float32 logits / T of a chunk, in the model dtype's matmul like the output layer; padding -> _NEG."""
    x = (hidden @ weight.t()).float()
    if temperature != 1.0:
        x = x / temperature
    if valid < x.shape[-1]:
        x[..., valid:] = _NEG
    return x


class _ChunkedLogprob(torch.autograd.Function):
    """log_softmax(hidden @ W^T / T)[target] (differentiable in hidden and W) and the entropy (not)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, true_vocab, chunk, want_entropy):
        group, rank, size = _tp()
        n, local = hidden.shape[0], weight.shape[0]
        start = rank * local
        valid = min(max(true_vocab - start, 0), local)  # this rank's real (non-padding) columns
        chunk = max(n, 1) if chunk <= 0 else min(chunk, max(n, 1))
        in_range = (targets >= start) & (targets < start + local)
        local_t = torch.where(in_range, targets - start, torch.zeros_like(targets))
        logp, ent, lse = (hidden.new_empty(n, dtype=torch.float32) for _ in range(3))
        keep_softmax = n <= chunk and any(ctx.needs_input_grad[:2])
        softmax = None
        for s0 in range(0, n, chunk):
            s1 = min(s0 + chunk, n)
            x = _chunk_logits(hidden[s0:s1], weight, temperature, valid)
            if valid:
                mx = x[:, :valid].max(dim=-1, keepdim=True).values
            else:
                mx = x.new_full((s1 - s0, 1), _NEG)
            if size > 1:
                dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=group)
            x -= mx  # padding columns stay ~_NEG
            picked = x.gather(-1, local_t[s0:s1].unsqueeze(-1)).squeeze(-1) * in_range[s0:s1]
            e = torch.exp(x)
            stats = [picked, e.sum(-1)]
            if want_entropy:
                stats.append(torch.linalg.vecdot(e, x))  # sum(e * (x - max)) without a temporary
            del x
            stats = torch.stack(stats)
            if size > 1:
                dist.all_reduce(stats, group=group)
            log_z = torch.log(stats[1])
            logp[s0:s1] = stats[0] - log_z
            lse[s0:s1] = mx.squeeze(-1) + log_z
            ent[s0:s1] = log_z - stats[2] / stats[1] if want_entropy else 0.0
            if keep_softmax:
                softmax = e.div_(stats[1].unsqueeze(-1))
            del e
        if any(ctx.needs_input_grad[:2]):
            ctx.save_for_backward(hidden, weight, local_t, in_range, lse, *([softmax] if keep_softmax else []))
        ctx.temperature, ctx.valid, ctx.chunk = temperature, valid, chunk
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, _grad_ent):
        hidden, weight, local_t, in_range, lse, *kept = ctx.saved_tensors
        T, n, chunk = ctx.temperature, hidden.shape[0], ctx.chunk
        g = grad_logp.float()
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        one_pass = n <= chunk or weight.dtype == torch.float32
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = torch.zeros_like(weight, dtype=weight.dtype if one_pass else torch.float32)
        for s0 in range(0, n, chunk):
            s1 = min(s0 + chunk, n)
            if kept:
                p = kept[0]
            else:
                p = _chunk_logits(hidden[s0:s1], weight, T, ctx.valid)
                p.sub_(lse[s0:s1].unsqueeze(-1)).exp_()  # softmax; padding columns exp(_NEG) = 0
            gs = g[s0:s1]
            grad = p.mul_(-gs.unsqueeze(-1))
            grad.scatter_add_(-1, local_t[s0:s1].unsqueeze(-1), (gs * in_range[s0:s1]).unsqueeze(-1))
            if T != 1.0:
                grad.div_(T)
            grad = grad.to(hidden.dtype)
            if grad_h is not None:
                torch.matmul(grad, weight, out=grad_h[s0:s1])
            if grad_w is not None:
                grad_w.add_((grad.t() @ hidden[s0:s1]).to(grad_w.dtype))
            del grad, p
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None, None


def token_logprobs_and_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               temperature: float, true_vocab: int, chunk_tokens: int = 0,
                               where: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """log_softmax(hidden @ weight^T / T)[targets] (differentiable) and the entropy per position (no grad).

    hidden [..., h] (gathered over TP), weight [V/tp, h] (this rank's vocab slice), targets [...].
    `where` (bool, shape of targets): only those positions go through the output projection (the
    others, e.g. prompt tokens and padding, are 0.0 in both results). Results have the shape of
    `targets`, float32."""
    return _apply(hidden, weight, targets, temperature, true_vocab, chunk_tokens, where, True)


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float,
                   true_vocab: int, chunk_tokens: int = 0, where: torch.Tensor | None = None) -> torch.Tensor:
    """`token_logprobs_and_entropy` without the entropy."""
    return _apply(hidden, weight, targets, temperature, true_vocab, chunk_tokens, where, False)[0]


def _apply(hidden, weight, targets, temperature, true_vocab, chunk, where, want_entropy):
    shape, n = targets.shape, targets.numel()
    h, t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if where is not None:
        idx = where.reshape(-1).nonzero().squeeze(-1)
        h, t = h.index_select(0, idx), t.index_select(0, idx)
    lp, ent = _ChunkedLogprob.apply(h, weight, t, temperature, true_vocab, chunk, want_entropy)
    if where is not None:
        lp = lp.new_zeros(n).index_copy(0, idx, lp)
        ent = ent.new_zeros(n).index_copy(0, idx, ent)
    return lp.view(shape), ent.view(shape)


@torch.no_grad()
def gather_full_logits(logits: torch.Tensor, true_vocab: int) -> torch.Tensor:
    """All vocab columns on every TP rank, padding removed (tests and debugging only)."""
    group, _, size = _tp()
    if size > 1:
        parts = [torch.empty_like(logits) for _ in range(size)]
        dist.all_gather(parts, logits.contiguous(), group=group)
        logits = torch.cat(parts, dim=-1)
    return logits[..., :true_vocab]
