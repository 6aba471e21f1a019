"""Model provider: a Megatron-Core `GPTModel` for a Qwen3 / Qwen2 / Llama HF `config.json`.

Owns: translating the HF config into a `TransformerConfig` (RMSNorm, SwiGLU, RoPE with the HF
theta, GQA, QK-norm for Qwen3, QKV bias for Qwen2, tied or untied embeddings, no other biases),
the padded vocabulary size, and the layer spec choice (transformer-engine on GPU when installed,
the local spec otherwise). Must not: load weights (that is `megagym.weights`) or train.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

SUPPORTED = {"qwen3": "qwen3", "qwen2": "qwen2", "llama": "llama", "mistral": "llama"}


@dataclass(frozen=True)
class HFArch:
    """What we read from an HF config.json (the fields that shape the Megatron model)."""

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qk_norm: bool
    qkv_bias: bool
    raw: dict

    @classmethod
    def from_dir(cls, path: str | Path) -> "HFArch":
        return cls.from_dict(json.loads((Path(path) / "config.json").read_text()))

    @classmethod
    def from_dict(cls, cfg: dict) -> "HFArch":
        model_type = cfg.get("model_type", "")
        if model_type not in SUPPORTED:
            raise ValueError(f"model_type {model_type!r} is not supported; supported: {sorted(SUPPORTED)}")
        family = SUPPORTED[model_type]
        if cfg.get("rope_scaling") not in (None, {}) and (cfg["rope_scaling"] or {}).get("rope_type", "default") != "default":
            raise ValueError(f"rope_scaling {cfg['rope_scaling']!r} is not supported")
        heads = cfg["num_attention_heads"]
        rope = cfg.get("rope_theta")
        if rope is None:  # transformers >= 5 nests it under rope_parameters
            rope = (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        return cls(
            family=family,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rope_theta=float(rope),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qk_norm=family == "qwen3",
            qkv_bias=family == "qwen2" or bool(cfg.get("attention_bias", False)),
            raw=cfg,
        )


def padded_vocab_size(vocab: int, divisible_by: int, tp: int) -> int:
    """Vocab rounded up to `divisible_by` (and to a multiple of tp if that does not already divide it).

    Unlike Megatron-LM (divisible_by * tp) the padding does not change with TP for any tp that
    divides `divisible_by`, so a checkpoint saved at TP=2 loads at TP=1 (convert) or TP=4.
    """
    import math

    multiple = divisible_by if divisible_by % tp == 0 else math.lcm(divisible_by, tp)
    return ((vocab + multiple - 1) // multiple) * multiple


def te_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


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


def layer_spec(arch: HFArch, which: str = "auto"):
    from megatron.core.models.gpt import gpt_layer_specs as specs

    use_te = te_available() if which == "auto" else which == "te"
    if use_te:
        return specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_norm)
    return specs.get_gpt_layer_local_spec(qk_layernorm=arch.qk_norm, normalization="RMSNorm")


def activation_kwargs(parallel) -> dict:
    """TransformerConfig kwargs for `parallel:`'s sequence parallelism and activation recomputation."""
    kw: dict[str, Any] = {"sequence_parallel": parallel.sequence_parallel}
    if parallel.recompute == "full":
        kw.update(recompute_granularity="full", recompute_method=parallel.recompute_method,
                  recompute_num_layers=parallel.recompute_num_layers)
    elif parallel.recompute == "selective":
        kw.update(recompute_granularity="selective", recompute_modules=["core_attn"])
    return kw


def build_gpt_model(arch: HFArch, dtype: torch.dtype = torch.float32, which_spec: str = "auto",
                    divisible_by: int = 128, **config_kwargs: Any):
    """The local pipeline stage of a GPTModel for `arch` under the current parallel state.

    `config_kwargs` go to the TransformerConfig (e.g. `activation_kwargs(cfg.parallel)`)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    config = transformer_config(arch, tp, pp, dtype, **config_kwargs)
    spec = layer_spec(arch, which_spec)
    if config.sequence_parallel:
        from megagym.trainer.sp_norm import local_block_spec

        spec = local_block_spec(spec, config)  # no-op for TE's norms; see sp_norm.py
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=padded_vocab_size(arch.vocab_size, divisible_by, tp),
        max_sequence_length=arch.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=int(arch.rope_theta),
    )
    mark_tensor_parallel_params(model)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return model.to(device=device, dtype=dtype)


def mark_tensor_parallel_params(model) -> int:
    """Set Megatron's `tensor_model_parallel` attributes on the local spec's parallel layers.

    megatron-core (0.16) sets them only while initialising weights; with
    `perform_initialization=False` + `use_cpu_initialization` (weights come from HF) they are
    missing, and the gradient norm then counts every TP shard as a duplicate: clipping (and the
    reported grad norm) silently use the norm of one TP rank's shard only. Returns how many were set.
    """
    from megatron.core.tensor_parallel import layers

    marked = 0
    for module in model.modules():
        if isinstance(module, (layers.ColumnParallelLinear, layers.VocabParallelEmbedding)):
            dim = 0
        elif isinstance(module, layers.RowParallelLinear):
            dim = 1
        else:
            continue
        for pname in ("weight", "bias"):
            param = getattr(module, pname, None)
            if pname == "bias" and dim == 1:
                continue  # a row-parallel bias is replicated
            if isinstance(param, torch.nn.Parameter) and not getattr(param, "tensor_model_parallel", False):
                layers.set_tensor_model_parallel_attributes(param, True, dim, 1)
                marked += 1
    return marked
