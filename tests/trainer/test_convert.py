"""`megagym convert --to-hf` on a TP2xPP2 checkpoint: transformers loads the folder and its logits
equal the trained Megatron model's; the convert writes safetensors, config and tokenizer files."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from ._common import REPO


def test_convert_to_hf_matches_trained_model(trained_run, tmp_path):
    out = tmp_path / "hf_out"
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "MASTER_PORT", "LOCAL_RANK"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-m", "megagym.cli", "convert", "--to-hf", str(trained_run / "ckpt"),
                           str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(n.startswith(".tmp") for n in os.listdir(tmp_path))

    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ref = torch.load(trained_run / "trained_logits.pt", weights_only=True)
    with torch.no_grad():
        for seq, want in zip(ref["seqs"], ref["logits"]):
            got = model(torch.tensor([seq])).logits[0, :-1]
            assert float((got - want).abs().max()) <= 1e-4


def test_convert_refuses_incomplete_checkpoint(tmp_path):
    from megagym.weights.convert import main

    (tmp_path / "ckpt").mkdir()
    try:
        main(["--to-hf", str(tmp_path / "ckpt"), str(tmp_path / "out")])
    except FileNotFoundError as e:
        assert "COMPLETE" in str(e)
    else:
        raise AssertionError("an incomplete checkpoint converted")
