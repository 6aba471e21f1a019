"""HF <-> Megatron weight map of the dense Llama family: Llama, Mistral, Qwen2 (QKV bias), Qwen3 (QK-norm).

Owns: for each Megatron-Core `GPTModel` parameter (global layer numbering, local or TE layer
spec names), which HF tensors it comes from, how a TP shard is cut from them and how the shards
are put back into HF tensors. Layouts:
  linear_qkv   rows grouped per query group g: [q heads of g (heads/groups x head_dim), k_g, v_g];
               TP rank r holds a contiguous block of groups.
  linear_fc1   TP rank r holds [gate rows of r; up rows of r] (SwiGLU fused).
  linear_proj, linear_fc2   row-parallel (split on the input dim).
  embedding / output_layer  vocab-parallel (dim 0), padded with zero rows to the padded vocab.
Must not: do any communication or file I/O (callers gather shards and read files).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


@dataclass
class ParamMap:
    """How one Megatron parameter relates to HF tensors.

    to_shard(hf: dict[name, full tensor], tp_rank, tp_size) -> this rank's shard
    from_shards(shards: list over tp ranks) -> dict[hf name, full tensor]
    """

    hf_names: list[str]
    to_shard: Callable[[dict, int, int], torch.Tensor]
    from_shards: Callable[[list], dict]
    tp_dim: int | None


def _replicated(hf: str) -> ParamMap:
    return ParamMap([hf], lambda t, r, n: t[hf], lambda s: {hf: s[0]}, None)


def _split(hf: str, dim: int) -> ParamMap:
    return ParamMap([hf], lambda t, r, n: t[hf].chunk(n, dim=dim)[r],
                    lambda s: {hf: torch.cat(s, dim=dim) if len(s) > 1 else s[0]}, dim)


def _vocab(hf: str, vocab: int, padded: int) -> ParamMap:
    def to_shard(t, r, n):
        w = t[hf]
        if padded > w.shape[0]:
            w = torch.cat([w, w.new_zeros(padded - w.shape[0], *w.shape[1:])])
        return w.chunk(n, dim=0)[r]

    def from_shards(s):
        full = torch.cat(s, dim=0) if len(s) > 1 else s[0]
        return {hf: full[:vocab]}

    return ParamMap([hf], to_shard, from_shards, 0)


def _qkv(prefix: str, suffix: str, heads: int, groups: int, head_dim: int) -> ParamMap:
    names = [f"{prefix}.{p}_proj.{suffix}" for p in ("q", "k", "v")]
    per = heads // groups

    def to_shard(t, r, n):
        q, k, v = (t[x] for x in names)
        rest = q.shape[1:]
        fused = torch.cat([q.reshape(groups, per * head_dim, *rest), k.reshape(groups, head_dim, *rest),
                           v.reshape(groups, head_dim, *rest)], dim=1)
        return fused.chunk(n, dim=0)[r].reshape(-1, *rest)

    def from_shards(s):
        full = torch.cat(s, dim=0) if len(s) > 1 else s[0]
        rest = full.shape[1:]
        g = full.reshape(groups, (per + 2) * head_dim, *rest)
        q, k, v = g.split([per * head_dim, head_dim, head_dim], dim=1)
        return {names[0]: q.reshape(-1, *rest), names[1]: k.reshape(-1, *rest), names[2]: v.reshape(-1, *rest)}

    return ParamMap(names, to_shard, from_shards, 0)


def _gate_up(prefix: str) -> ParamMap:
    gate, up = f"{prefix}.gate_proj.weight", f"{prefix}.up_proj.weight"

    def to_shard(t, r, n):
        return torch.cat([t[gate].chunk(n, dim=0)[r], t[up].chunk(n, dim=0)[r]], dim=0)

    def from_shards(s):
        halves = [x.chunk(2, dim=0) for x in s]
        return {gate: torch.cat([h[0] for h in halves], dim=0), up: torch.cat([h[1] for h in halves], dim=0)}

    return ParamMap([gate, up], to_shard, from_shards, 0)


def param_map(name: str, arch, padded_vocab: int) -> ParamMap | None:
    """The map of Megatron parameter `name` (global layer index), or None for a tied output layer."""
    if name == "embedding.word_embeddings.weight":
        return _vocab("model.embed_tokens.weight", arch.vocab_size, padded_vocab)
    if name == "output_layer.weight":
        src = "model.embed_tokens.weight" if arch.tie_word_embeddings else "lm_head.weight"
        return _vocab(src, arch.vocab_size, padded_vocab)
    if name == "decoder.final_layernorm.weight":
        return _replicated("model.norm.weight")
    m = _LAYER.match(name)
    if not m:
        raise KeyError(f"no HF mapping for Megatron parameter {name!r}")
    i, rest = int(m.group(1)), m.group(2)
    p = f"model.layers.{i}"
    table = {
        "input_layernorm.weight": lambda: _replicated(f"{p}.input_layernorm.weight"),
        "self_attention.linear_qkv.layer_norm_weight": lambda: _replicated(f"{p}.input_layernorm.weight"),
        "self_attention.linear_qkv.weight": lambda: _qkv(f"{p}.self_attn", "weight", arch.num_heads,
                                                         arch.num_kv_heads, arch.head_dim),
        "self_attention.linear_qkv.bias": lambda: _qkv(f"{p}.self_attn", "bias", arch.num_heads,
                                                       arch.num_kv_heads, arch.head_dim),
        "self_attention.q_layernorm.weight": lambda: _replicated(f"{p}.self_attn.q_norm.weight"),
        "self_attention.k_layernorm.weight": lambda: _replicated(f"{p}.self_attn.k_norm.weight"),
        "self_attention.linear_proj.weight": lambda: _split(f"{p}.self_attn.o_proj.weight", 1),
        "pre_mlp_layernorm.weight": lambda: _replicated(f"{p}.post_attention_layernorm.weight"),
        "mlp.linear_fc1.layer_norm_weight": lambda: _replicated(f"{p}.post_attention_layernorm.weight"),
        "mlp.linear_fc1.weight": lambda: _gate_up(f"{p}.mlp"),
        "mlp.linear_fc2.weight": lambda: _split(f"{p}.mlp.down_proj.weight", 1),
    }
    if rest not in table:
        raise KeyError(f"no HF mapping for Megatron parameter {name!r}")
    return table[rest]()


def exported(name: str, arch) -> bool:
    """Whether `name` contributes HF tensors on export (a tied output layer does not)."""
    return not (name == "output_layer.weight" and arch.tie_word_embeddings)
