"""The local layer spec's core attention, taught packed rows.

Owns: `SegmentAttention`, megatron-core's `DotProductAttention` (the local spec's unfused core
attention) with one more case. A packed row, given as `PackedSeqParams(qkv_format="sbhd")` holding
the samples' cumulative lengths (`packing.segment_params`), is attended sample by sample with
torch's `scaled_dot_product_attention`, causal within each sample. A packed row then costs the sum
of its samples' squared lengths and keeps no scores (torch's fused CPU kernel keeps the output and
a log-sum-exp), as THD attention does on GPU, instead of a dense row-by-row mask.
Without `packed_seq_params` it is `DotProductAttention` unchanged: padded micro-batches give the
numbers they gave before.
Must not: be used with transformer-engine (TE's attention takes THD rows itself); build packed
rows or their positions (`packing.py`).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention


class SegmentAttention(DotProductAttention):
    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is None:
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias)
        if packed_seq_params.qkv_format != "sbhd" or query.shape[1] != 1:
            raise ValueError(f"SegmentAttention takes one packed row in sbhd layout, got "
                             f"qkv_format={packed_seq_params.qkv_format!r} and batch {query.shape[1]}")
        if self.softmax_offset is not None or attention_bias is not None:
            raise NotImplementedError("packed rows with attention sinks or an attention bias need transformer-engine")
        scale = self.softmax_scale * (self.scale_mask_softmax.scale or 1.0)  # query-key layer scaling
        # [1, heads, s, head_dim]: torch's fused CPU kernel takes 4-d inputs only (3-d ones fall back to
        # the unfused maths, which keeps the scores). Grouped-query attention without repeating the
        # key/value heads (`enable_gqa`: same kernel, same outputs, no copies)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        gqa = self.num_attention_heads_per_partition != self.num_query_groups_per_partition
        dropout = self.attention_dropout.p if self.training else 0.0
        bounds = packed_seq_params.cu_seqlens_q.tolist()
        out = torch.cat([
            torch.nn.functional.scaled_dot_product_attention(
                q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], dropout_p=dropout, is_causal=True, scale=scale,
                enable_gqa=gqa)
            for a, b in zip(bounds[:-1], bounds[1:]) if b > a], dim=2)  # [1, heads, s, head_dim]
        return out.permute(2, 0, 1, 3).reshape(out.shape[2], 1, self.hidden_size_per_partition)
