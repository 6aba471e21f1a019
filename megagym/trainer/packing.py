"""Sequence packing: several samples in one row, each attending only to itself.

Owns: filling micro-batches with whole samples by first-fit decreasing up to the token budget,
the packed row (tokens back to back, position ids restarting at 0 for every sample), and how the
attention is told where samples begin, in one of two layouts:
  - "segments" (local layer spec, CPU): the samples' boundaries in a `PackedSeqParams` with
    qkv_format "sbhd", which `segment_attention.SegmentAttention` attends sample by sample, and
    rotary embeddings taken at the per-sample position ids, so that every sample sees exactly the
    positions 0..n-1 it would see alone (Megatron's local spec otherwise rotates by the row index);
  - "thd" (transformer-engine spec, GPU): Megatron's `PackedSeqParams(qkv_format="thd")` with the
    cumulative sample lengths; TE's attention and Megatron's RoPE restart per sample themselves.
    Written against megatron-core's API; it has not run here (no transformer-engine on CPU).
Bad input: a sample longer than the budget is an error naming both (never a silent truncation).
Must not: compute losses or logprobs; unpacking per-sample values is the caller's, through
`MicroBatch.spans()`.
"""

from __future__ import annotations

import torch


def check_fits(lengths: dict[int, int] | list[int], budget: int) -> None:
    """Raise if any sample's input length exceeds the micro-batch token budget."""
    items = lengths.items() if isinstance(lengths, dict) else enumerate(lengths)
    for i, n in items:
        if n > budget:
            raise ValueError(f"sample {i} has {n} input tokens but optim.micro_batch_tokens is {budget}: "
                             f"raise micro_batch_tokens to at least {n} (samples are never truncated)")


def pack_bins(ids: list[int], lengths: list[int], budget: int) -> list[list[int]]:
    """First-fit decreasing: sample indices into bins whose summed lengths stay <= budget."""
    check_fits({i: lengths[i] for i in ids}, budget)
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(ids, key=lambda i: (-lengths[i], i)):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(budget - lengths[i])
    return bins


def packed_params(seq_lens: list[int], total: int, layout: str, device=None):
    """Megatron's PackedSeqParams for one packed row of `total` tokens (row padding, if any, is one
    more sequence). "thd": TE's attention and Megatron's RoPE read the row as THD. "segments": the
    local spec's `SegmentAttention` reads the boundaries, the tensors stay [s, b=1, ...] (sbhd) and
    max_seqlen is the row's length, so that Megatron sizes the rotary table for the whole row."""
    from megatron.core.packed_seq_params import PackedSeqParams

    lens = list(seq_lens) + ([total - sum(seq_lens)] if total > sum(seq_lens) else [])
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens, dtype=torch.int32), 0)
    cu = cu.to(device)
    longest = max(lens) if layout == "thd" else total
    return PackedSeqParams(qkv_format="thd" if layout == "thd" else "sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


def attention_kwargs(seq_lens: list[int] | None, total: int, layout: str, device) -> dict:
    """Model-forward kwargs for a packed row (`seq_lens`), or {} for a padded micro-batch."""
    if seq_lens is None:
        return {}
    return {"packed_seq_params": packed_params(seq_lens, total, layout, device)}


def rope_at_position_ids(gpt) -> None:
    """Make the local spec's rotary embedding follow the `position_ids` given to `gpt.forward`.

    Megatron's GPTModel rotates position i of a row by angle i whatever `position_ids` say; a
    packed row needs each sample's own positions (0..n-1), for the same numbers as unpacked."""
    rope = getattr(gpt, "rotary_pos_emb", None)
    if rope is None:
        return
    state: dict = {}

    def remember(_module, args, kwargs):
        state["pos"] = kwargs.get("position_ids", args[1] if len(args) > 1 else None)

    gpt.register_forward_pre_hook(remember, with_kwargs=True)
    table = rope.forward

    def forward(max_seq_len, offset=0, packed_seq=False, cp_group=None):
        pos = state.get("pos")
        if pos is None or packed_seq or offset or pos.shape[1] != max_seq_len:
            return table(max_seq_len, offset, packed_seq, cp_group)
        emb = table(int(pos.max()) + 1)  # [P, 1, 1, d]
        return emb[:, 0, 0][pos.t()].unsqueeze(2)  # [s, b, 1, d]: row b rotated by its own positions

    rope.forward = forward
