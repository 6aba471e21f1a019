"""GRPO train steps on Megatron (DP4, TP2xDP2, PP2xDP2, TP2xPP2) vs a transformers + torch AdamW
reference; checkpoint resume gives the uninterrupted run's next step. One torchrun launch (4 ranks)."""

from __future__ import annotations

import pytest

from ._common import read_json

LAYOUTS = ["dp4", "tp2dp2", "pp2dp2", "tp2pp2"]


@pytest.fixture(scope="module")
def train(trained_run):
    return read_json(trained_run / "train.json")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_loss_and_grad_norm_match_reference(train, layout):
    r = train["layouts"][layout]
    for got, want in zip(r["metrics"], r["ref"]):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-6)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_weights_after_two_steps_match_reference(train, layout):
    # Adam divides by sqrt(v): on entries whose gradient is ~1e-9 float noise changes the update
    # direction, so a bound relative to lr (2e-2) rather than bit-equality.
    assert train["layouts"][layout]["weight_diff"] < 2e-3


@pytest.mark.parametrize("layout", LAYOUTS)
def test_metrics_and_schedule(train, layout):
    m1, m2 = train["layouts"][layout]["metrics"]
    assert m1["lr"] == pytest.approx(0.01) and m2["lr"] == pytest.approx(0.02)  # warmup 2 steps
    assert m1["tokens"] == m2["tokens"] == 48.0  # generated tokens of the global batch
    assert m1["clip_fraction"] == 0.0 < m2["clip_fraction"]  # old logprobs fixed before step 1
    assert 0 < m1["entropy"] <= 12.0  # <= log(151669) ~ 11.93
    assert m1["gen_abs_diff"] > 0 and m1["gen_k3"] > 0  # generation logprobs were perturbed
    assert 0 < m1["is_weight"] <= 1.5  # truncated at tis_threshold
    assert m1["update_ok"] == 1.0 and m1["step"] == 1.0 and m2["step"] == 2.0
    assert all(isinstance(v, float) for v in m1.values())
    assert train["layouts"][layout]["old_len_ok"]


def test_resume_gives_same_next_step(train):
    r = train["resume"]
    assert r["extra_state"] == {"data_position": 12, "epoch": 0}
    assert r["step_after"] == 3.0
    assert r["loss"][0] == r["loss"][1]
    assert r["grad_norm"][0] == r["grad_norm"][1]
    assert r["lr"][0] == r["lr"][1]
    assert r["weights_equal"], (r["weights_max_diff"], r["weights_diff_names"])


def test_kl_to_reference_model(train):
    """grpo.kl_coef > 0: the policy builds a frozen reference (the initial weights) and adds
    kl_coef * k3(ref, logp). At step 1 policy == reference, so k3 and its gradient are ~zero and the
    step equals the no-KL run's; step 2 then differs exactly by kl_coef * mean k3."""
    r, plain = train["kl"], train["layouts"]["tp2pp2"]["metrics"]
    assert r["ref_vs_policy_at_start"] < 1e-5  # same weights; fp32 rounding of two model objects
    assert r["ref_moved"] == 0.0 and r["policy_moved"] > 1e-3  # only the policy trains
    k1, k2 = r["metrics"]
    assert abs(k1["kl"]) < 1e-10 and k2["kl"] > 1e-6
    assert k1["loss"] == pytest.approx(plain[0]["loss"], rel=1e-6, abs=1e-7)
    assert k1["grad_norm"] == pytest.approx(plain[0]["grad_norm"], rel=1e-5)
    assert k2["loss"] == pytest.approx(plain[1]["loss"] + r["coef"] * k2["kl"], rel=1e-5, abs=1e-6)
