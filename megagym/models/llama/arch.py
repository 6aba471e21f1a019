"""The Llama family's architecture, read from an HF `config.json` (Llama, Mistral, Qwen2, Qwen3).

Owns: `HFArch` — the fields that shape the Megatron model (sizes, heads, GQA groups, head_dim,
RoPE theta, RMSNorm epsilon, tied embeddings), with the variants' differences: QK-norm (Qwen3),
QKV bias (Qwen2, or `attention_bias`). RoPE scaling other than the default is refused.
Must not: import torch or megatron (plain data, read by the trainer and the weight maps alike).
"""

from __future__ import annotations

from dataclasses import dataclass

MODEL_TYPES = ("qwen3", "qwen2", "llama", "mistral")


@dataclass(frozen=True)
class HFArch:
    """What we read from an HF config.json (the fields that shape the Megatron model)."""

    family: str  # the models/<family>/ folder that builds and maps it
    model_type: str  # config.json's model_type (qwen3, qwen2, llama, mistral)
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
    def from_config(cls, cfg: dict) -> "HFArch":
        model_type = cfg.get("model_type", "")
        if cfg.get("rope_scaling") not in (None, {}) and (cfg["rope_scaling"] or {}).get("rope_type", "default") != "default":
            raise ValueError(f"rope_scaling {cfg['rope_scaling']!r} is not supported")
        heads = cfg["num_attention_heads"]
        rope = cfg.get("rope_theta")
        if rope is None:  # transformers >= 5 nests it under rope_parameters
            rope = (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        return cls(
            family="llama",
            model_type=model_type,
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
            qk_norm=model_type == "qwen3",
            qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
            raw=cfg,
        )
