"""The Llama family on Megatron-Core: its `TransformerConfig` and layer spec.

Owns: translating an `HFArch` into Megatron's `TransformerConfig` (RMSNorm, SwiGLU, RoPE, GQA,
QK-norm for Qwen3, QKV bias for Qwen2, no other biases) and its layer spec (transformer-engine's
or the local one, as the trainer decides: trainer/model.py `uses_te`). megatron.core is imported
inside the functions, so the registry stays cheap to import.
Must not: build the model, load weights or hold parallel state (trainer/model.py does).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from megagym.models.llama.arch import HFArch


def transformer_config(arch: HFArch, tp: int, pp: int, dtype: torch.dtype, **extra: Any):
    from megatron.core.transformer.transformer_config import TransformerConfig

    if arch.num_layers % pp:
        raise ValueError(f"{arch.num_layers} layers do not split into {pp} pipeline stages")
    if arch.num_kv_heads % tp or arch.num_heads % tp:
        raise ValueError(f"{arch.num_heads} heads / {arch.num_kv_heads} kv heads do not split over TP={tp}")
    on_cpu = not torch.cuda.is_available()
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.intermediate_size,
        num_attention_heads=arch.num_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=on_cpu,
        perform_initialization=False,  # weights always come from an HF checkpoint
        calculate_per_token_loss=True,  # loss / (valid tokens of the global batch), see step.py
        moe_token_dispatcher_type="alltoall",  # dense model; "allgather" refuses variable lengths
        variable_seq_lengths=True,  # micro-batches have their own padded length (p2p sends shapes)
        deallocate_pipeline_outputs=not on_cpu,
        **extra,
    )


def layer_spec(arch: HFArch, use_te: bool):
    """Transformer-engine's layer spec (GPU) or Megatron's local one (CPU), whose core attention is
    megagym's `SegmentAttention` (Megatron's, plus packed rows attended sample by sample)."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    from megagym.trainer.segment_attention import SegmentAttention

    if use_te:
        return specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_norm)
    spec = specs.get_gpt_layer_local_spec(qk_layernorm=arch.qk_norm, normalization="RMSNorm")
    attn = spec.submodules.self_attention
    attn = dataclasses.replace(attn, submodules=dataclasses.replace(attn.submodules, core_attention=SegmentAttention))
    return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, self_attention=attn))
