"""The output layer as the loss runs it: the model hands out hidden states, not logits.

Owns: deferring a GPTModel's output layer so that its forward returns the final hidden states
(gathered over the sequence-parallel ranks, or marked for a TP all-reduce of their gradient,
exactly as Megatron's ColumnParallelLinear would treat its input) instead of the `tokens x
vocab/tp` logits; the weight that layer would have used (the shared embedding when tied); and the
full logits for tests. The logits are then formed chunk by chunk inside
`logprobs.token_logprobs*`, so a micro-batch's logits never exist whole (`optim.logprob_chunk_tokens`).
The layer's parameters keep their names and shapes: checkpoints and weight export are untouched.
Must not: compute logprobs or losses (that is `logprobs.py` / `loss.py`).
"""

from __future__ import annotations

import torch


class _CopyToTensorParallel(torch.autograd.Function):
    """Identity forward; backward all-reduces the gradient over the TP ranks.

    Not Megatron's `copy_to_tensor_model_parallel_region`: its backward all-reduces
    `grad.contiguous()` and returns `grad`, so a non-contiguous gradient (this one comes back
    through GPTModel's `transpose(0, 1)`) silently stays un-reduced."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


def defer_output_layer(gpt) -> None:
    """Make `gpt.output_layer` (last pipeline stage only) return (hidden [s, b, h], None)."""
    layer = getattr(gpt, "output_layer", None)
    if layer is None:
        return
    sequence_parallel = bool(gpt.config.sequence_parallel)

    def forward(hidden, weight=None, runtime_gather_output=None):
        from megatron.core import parallel_state
        from megatron.core import tensor_parallel as tpl

        if sequence_parallel:  # [s/tp, b, h] -> [s, b, h]; backward reduce-scatters the gradient
            return tpl.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True), None
        if parallel_state.get_tensor_model_parallel_world_size() == 1:
            return hidden, None
        return _CopyToTensorParallel.apply(hidden, parallel_state.get_tensor_model_parallel_group()), None

    layer.forward = forward


def output_weight(gpt) -> torch.Tensor | None:
    """This rank's vocab slice [V/tp, h] of the output projection (the embedding when tied); None
    on a pipeline stage without the output layer."""
    if not gpt.post_process:
        return None
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight


def unwrap(model):
    """The GPTModel inside Megatron's DDP (or the model itself)."""
    return getattr(model, "module", model)


@torch.no_grad()
def full_logits(gpt, hidden: torch.Tensor, true_vocab: int) -> torch.Tensor:
    """All vocab columns of the logits on every TP rank (tests and debugging only: materialises them)."""
    from megagym.trainer.logprobs import gather_full_logits

    return gather_full_logits(hidden @ output_weight(gpt).t(), true_vocab)
