"""Micro-batching and one pass of Megatron's forward/backward schedule over a list of samples.

Owns: splitting a global batch over data-parallel ranks (balanced by tokens), cutting each
rank's share into micro-batches by a token budget, the micro-batch tensors, and running
`get_forward_backward_func()` (no pipelining or 1F1B, chosen by Megatron from the parallel
state) with a loss function or a collector on the last pipeline stage (the GRPO loss function
is `loss.grpo_loss_fn`).

Two layouts. Padded (default): each micro-batch holds whole samples right-padded to its own
longest sample, rows sorted by length so neighbours pad little; causal attention makes
right-padding harmless (padding comes after every real token and is masked out of the loss).
Packed (`optim.pack_sequences`, `packing.py`): one row per micro-batch holding several samples
back to back, with per-sample positions and attention confined to each sample. Either way
`MicroBatch.spans()` says where each sample's tokens are. Pipeline stages receive each
micro-batch's shape first (`variable_seq_lengths`), so micro-batches need not share a shape.
With sequence parallelism the row length is padded to a multiple of the TP size.
Must not: own the optimizer or the model (that is `policy.py`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class MicroBatch:
    tokens: torch.Tensor      # [b, L] inputs (sample tokens[:-1]), right-padded with 0
    targets: torch.Tensor     # [b, L] next tokens (sample tokens[1:])
    mask: torch.Tensor        # [b, L] float, 1 where the target token is trained on
    position_ids: torch.Tensor
    sample_ids: list[int]     # index into the global sample list (padded: one per row)
    lengths: list[int]        # valid length of each sample (len(sample) - 1)
    extras: dict = field(default_factory=dict)  # name -> [b, L] float tensors (gen, adv, old, ref)
    seq_lens: list[int] | None = None  # packed: the samples' lengths in the one row, in order

    def spans(self):
        """(sample id, row, start, length) of every real sample in this micro-batch."""
        start = 0
        for k, (sid, n) in enumerate(zip(self.sample_ids, self.lengths)):
            if sid >= 0:
                yield sid, (0 if self.seq_lens is not None else k), start, n
            if self.seq_lens is not None:
                start += n


def split_over_dp(lengths: list[int], dp_size: int) -> list[list[int]]:
    """Sample indices per DP rank, longest-first onto the least-loaded rank (deterministic)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    shares: list[list[int]] = [[] for _ in range(dp_size)]
    load = [0] * dp_size
    for i in order:
        r = min(range(dp_size), key=lambda k: (load[k], k))
        shares[r].append(i)
        load[r] += lengths[i]
    return shares


def plan_micro_batches(ids: list[int], lengths: list[int], token_budget: int) -> list[list[int]]:
    """Group sample indices so that rows x longest row <= token_budget (a longer sample is an error)."""
    from megagym.trainer.packing import check_fits

    check_fits({i: lengths[i] for i in ids}, token_budget)
    order = sorted(ids, key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= token_budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def build_micro_batch(sample_ids: list[int], token_ids: list[list[int]], loss_masks: list[list[int]],
                      per_token: dict[str, list], per_sample: dict[str, list[float]], packed: bool = False,
                      seq_multiple: int = 1) -> MicroBatch:
    """Tensors of one micro-batch: one right-padded row per sample, or (`packed`) one row holding the
    samples back to back. `per_token[name][i]` is aligned with sample i's tokens (length n); it is
    shifted like the targets. `per_sample[name][i]` is broadcast over sample i's tokens. The row
    length is rounded up to `seq_multiple` (the TP size under sequence parallelism)."""
    lens = [max(len(token_ids[i]) - 1, 1) for i in sample_ids]
    b, L = (1, sum(lens)) if packed else (len(sample_ids), max(lens))
    L = -(-L // seq_multiple) * seq_multiple
    tokens = torch.zeros(b, L, dtype=torch.long)
    targets = torch.zeros(b, L, dtype=torch.long)
    mask = torch.zeros(b, L)
    pos = torch.zeros(b, L, dtype=torch.long)
    extras = {k: torch.zeros(b, L) for k in list(per_token) + list(per_sample)}
    start = 0
    for k, (i, width) in enumerate(zip(sample_ids, lens)):
        row, cols = (0, slice(start, start + width)) if packed else (k, slice(0, width))
        pos[row, cols] = torch.arange(width)
        start += width
        ids = token_ids[i]
        n = len(ids) - 1
        if n < 1:
            continue  # a 0/1-token sample has nothing to predict: one masked position
        tokens[row, cols] = torch.tensor(ids[:-1])
        targets[row, cols] = torch.tensor(ids[1:])
        mask[row, cols] = torch.tensor(loss_masks[i][1:], dtype=torch.float)
        for name, vals in per_token.items():
            v = vals[i]
            extras[name][row, cols] = (v[1:] if torch.is_tensor(v) else torch.tensor(v[1:], dtype=torch.float)).float()
        for name, vals in per_sample.items():
            extras[name][row, cols] = float(vals[i])
    if not packed:  # padding positions continue the row's positions, as an unpadded forward would
        pos = torch.arange(L).unsqueeze(0).expand(b, L).contiguous()
    return MicroBatch(tokens, targets, mask, pos, list(sample_ids), lens, extras, lens if packed else None)


def empty_micro_batch(extra_names: list[str]) -> MicroBatch:
    """One fully masked row, for a DP rank that received no samples."""
    z = torch.zeros(1, 1, dtype=torch.long)
    return MicroBatch(z, z.clone(), torch.zeros(1, 1), z.clone(), [-1], [1],
                      {k: torch.zeros(1, 1) for k in extra_names})


def run_schedule(model, micro_batches: list[MicroBatch],
                 on_logits: Callable[[torch.Tensor, MicroBatch], tuple[torch.Tensor, torch.Tensor]],
                 forward_only: bool, packed_layout: str = "segments") -> None:
    """Run Megatron's schedule; `on_logits(hidden [b, L, h], mb) -> (loss_sum, num_tokens)` on the last stage.

    The model's output layer is deferred (`head.defer_output_layer`): the last stage hands out the
    final hidden states and `on_logits` forms the logits (chunked) with `head.output_weight`.
    `packed_layout` ("segments" / "thd", see `packing.py`) says how packed rows reach the attention."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megagym.trainer.packing import attention_kwargs

    device = next(model.parameters()).device
    it = iter(micro_batches)

    def forward_step(data_iterator, chunk):
        mb = next(data_iterator)
        attn = attention_kwargs(mb.seq_lens, mb.tokens.shape[1], packed_layout, device)
        out = chunk(mb.tokens.to(device), mb.position_ids.to(device), None, **attn)

        def loss_func(logits):
            loss_sum, ntok = on_logits(logits, mb)
            return loss_sum, ntok, {}

        return out, loss_func

    fb = get_forward_backward_func()
    ctx = torch.no_grad() if forward_only else contextlib.nullcontext()
    with ctx:
        fb(
            forward_step_func=forward_step,
            data_iterator=it,
            model=[model],
            num_microbatches=len(micro_batches),
            seq_length=max(mb.tokens.shape[1] for mb in micro_batches),
            micro_batch_size=max(mb.tokens.shape[0] for mb in micro_batches),
            forward_only=forward_only,
        )


def to_device(mb: MicroBatch, device) -> MicroBatch:
    return MicroBatch(mb.tokens.to(device), mb.targets.to(device), mb.mask.to(device), mb.position_ids.to(device),
                      mb.sample_ids, mb.lengths, {k: v.to(device) for k, v in mb.extras.items()}, mb.seq_lens)

