"""Import a GGUF file into a normal HF model folder (safetensors, config.json, tokenizer, chat template).

Owns: reading a GGUF header (architecture), refusing architectures megagym cannot train, and
writing the folder: transformers dequantizes the GGUF (`from_pretrained(..., gguf_file=...)`, needs
the `gguf` and `accelerate` packages); its `save_pretrained` refuses a GGUF-flagged model, so the
state dict goes out with safetensors (tied `lm_head.weight` left out) and `config.json` without
`quantization_config`. The folder is written next to OUT_DIR and renamed into place, so an
interrupted import leaves nothing half-written. A `megagym_import.json` records the source file,
its sha256, the dtype, and that the weights are dequantized (not the published full-precision ones).
Must not: download anything (`megagym.models.fetch` does) or know any one model by name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

# GGUF `general.architecture` -> HF model_type, for the architectures that transformers dequantizes
# and megagym's trainer builds (the dense Llama family; see megagym/trainer/model.py:SUPPORTED).
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
DTYPES = ("float32", "bfloat16")
PROVENANCE = "megagym_import.json"


class GGUFImportError(ValueError):
    """A GGUF file megagym cannot import; the message names the file and the cause."""


def sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def gguf_architecture(path: str | Path) -> str:
    """`general.architecture` of a GGUF file (reads the header only)."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise GGUFImportError(f"{path}: no such file")
    try:
        reader = GGUFReader(path, "r")
    except Exception as e:  # not GGUF, truncated, wrong version
        raise GGUFImportError(f"{path}: not a readable GGUF file ({e})") from None
    field = reader.fields.get("general.architecture")
    if field is None:
        raise GGUFImportError(f"{path}: GGUF header has no general.architecture")
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def import_gguf(gguf_file: str | Path, out_dir: str | Path, dtype: str = "float32",
                source: str | None = None) -> Path:
    """Write an HF folder for `gguf_file` to `out_dir` (replacing it); returns `out_dir`."""
    gguf_file, out_dir = Path(gguf_file).resolve(), Path(out_dir)
    if dtype not in DTYPES:
        raise GGUFImportError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    arch = gguf_architecture(gguf_file)
    if arch not in ARCHITECTURES:
        raise GGUFImportError(f"{gguf_file.name}: GGUF architecture '{arch}' is not supported "
                              f"(supported: {', '.join(sorted(ARCHITECTURES))})")
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.monotonic()
    torch_dtype = getattr(torch, dtype)
    kw = {"gguf_file": gguf_file.name}
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, dtype=torch_dtype, **kw)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, **kw)
    if model.config.model_type != ARCHITECTURES[arch]:
        raise GGUFImportError(f"{gguf_file.name}: transformers read model_type '{model.config.model_type}' "
                              f"for GGUF architecture '{arch}'")
    if not getattr(tokenizer, "chat_template", None):
        raise GGUFImportError(f"{gguf_file.name}: the GGUF carries no chat template (tokenizer.chat_template)")

    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        state = {k: v.detach().to(torch_dtype).contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config.pop("_name_or_path", None)
        config["architectures"] = [type(model).__name__]  # vLLM picks its model class from this
        config["dtype"] = dtype
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        model.generation_config.to_json_file(tmp / "generation_config.json")
        tokenizer.save_pretrained(tmp)
        (tmp / PROVENANCE).write_text(json.dumps({
            "source": source or str(gguf_file), "gguf_file": gguf_file.name, "gguf_sha256": sha256(gguf_file),
            "gguf_architecture": arch, "dtype": dtype,
            "note": "weights dequantized from the GGUF file, not the published full-precision weights"},
            indent=1) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"megagym model: imported {gguf_file.name} ({arch}, {sum(v.numel() for v in state.values()) / 1e6:.1f}M "
          f"parameters, {dtype}) -> {out_dir} in {time.monotonic() - t0:.1f}s", flush=True)
    return out_dir
