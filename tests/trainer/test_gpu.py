"""GPU checks (skipped without CUDA): bf16 Megatron (TE layer spec when transformer-engine is
installed) against transformers bf16, and bf16 train steps. Not run on the CPU machine."""

from __future__ import annotations

import math

import pytest

from ._common import read_json, torchrun

pytestmark = pytest.mark.gpu


def test_bf16_logprobs_and_train_steps(tiny_qwen3, tmp_path):
    out = tmp_path / "gpu.json"
    torchrun("worker_gpu.py", 1, [str(tiny_qwen3), str(out)], timeout=600)
    r = read_json(out)
    assert r["logprob_diff"] < 0.1  # bf16 vs bf16, different kernels
    assert r["gen_kl"] < 1e-2  # peers report ~1e-3 in bf16; 1e-2 means a bug
    for m in r["metrics"]:
        assert math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) and m["update_ok"] == 1.0


def test_bf16_packing_recompute_and_chunking_match_the_plain_step(tiny_qwen3, tmp_path):
    """Packed rows (THD PackedSeqParams with transformer-engine, else the mask), full recomputation
    and chunked logprobs in bf16 on CUDA give the plain step's numbers (bf16 tolerances)."""
    out = tmp_path / "gpu_scale.json"
    torchrun("worker_gpu_scale.py", 1, [str(tiny_qwen3), str(out)], timeout=600)
    r = read_json(out)
    for name, v in r.items():
        assert v["tokens_equal"], name
        assert v["loss_diff"] < 1e-2 and v["grad_norm_rel"] < 5e-2, (name, v)
        assert v["logprob_diff"] < 0.1, (name, v)  # bf16 kernels differ by row layout
    assert r["recompute"]["loss_diff"] == 0.0  # recomputation replays the same kernels
