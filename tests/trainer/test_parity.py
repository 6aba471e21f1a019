"""Megatron model == transformers model (fp32, CPU) at TP1 / TP2 / PP2 / TP2xPP2; HF -> Megatron -> HF bit-exact."""

from __future__ import annotations

import pytest

from ._common import read_json, torchrun


@pytest.fixture(scope="module")
def parity(tiny_qwen3, tiny_qwen3_untied, tmp_path_factory):
    out = tmp_path_factory.mktemp("parity") / "parity.json"
    torchrun("worker_parity.py", 4, [str(tiny_qwen3), str(tiny_qwen3_untied), str(out)], timeout=400)
    return read_json(out)


@pytest.mark.parametrize("layout", ["tp1", "tp2", "pp2", "tp2pp2", "tp2pp2_untied"])
def test_logits_match_transformers(parity, layout):
    assert parity[layout]["logit_diff"] <= 1e-4


@pytest.mark.parametrize("layout", ["tp1", "tp2", "pp2", "tp2pp2", "tp2pp2_untied"])
def test_temperature_logprobs_match_transformers(parity, layout):
    assert parity[layout]["logprob_diff"] <= 1e-4


@pytest.mark.parametrize("layout", ["tp1", "tp2", "pp2", "tp2pp2", "tp2pp2_untied"])
def test_hf_megatron_hf_is_bit_exact(parity, layout):
    r = parity[layout]
    assert r["names_missing"] == [] and r["names_extra"] == []
    assert r["export_exact"]
