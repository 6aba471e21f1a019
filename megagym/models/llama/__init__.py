"""The dense Llama family: Llama, Mistral, Qwen2 (QKV bias), Qwen3 (QK-norm).

arch.py (config.json -> HFArch), spec.py (Megatron TransformerConfig + layer spec), weights.py
(HF <-> Megatron weight map).
"""
