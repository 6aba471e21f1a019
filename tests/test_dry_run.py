"""`megagym train --dry-run`: the benchmark configs resolve, and mistakes are named before a job starts."""

import json
from pathlib import Path

import pytest

from megagym.config import ConfigError, load
from megagym.config.schema import RunConfig
from megagym.launch.dry_run import problems
from megagym.train import main as train_main

REPO = Path(__file__).resolve().parents[1]
GYM_BUILT = any((REPO / ".venv-gym").glob("lib/python3*/site-packages/nemo_gym/__init__.py"))


def _data(tmp_path: Path) -> Path:
    row = {"responses_create_params": {"input": [{"role": "user", "content": "1+1?"}]}, "expected_answer": "2"}
    p = tmp_path / "rows.jsonl"
    p.write_text(json.dumps(row) + "\n")
    return p


@pytest.mark.skipif(not GYM_BUILT, reason="needs .venv-gym (scripts/setup_gym.sh)")
@pytest.mark.parametrize("name,env", [("dapo17k_qwen3_4b", "dapo17k"),
                                      ("workplace_assistant_qwen3_4b", "workplace_assistant_full")])
def test_benchmark_configs_resolve(tmp_path, tiny_qwen3, name, env):
    rows = _data(tmp_path)
    overrides = [f"model.hf_path={tiny_qwen3}", f"env.definitions.{env}.train_data={rows}",
                 f"env.definitions.{env}.validation_data={rows}"]
    cfg = load(RunConfig, REPO / "configs" / f"{name}.yaml", overrides)
    assert cfg.rollout.n * cfg.train.prompts_per_step == 1024  # the reference global batch
    assert problems(cfg, nproc=2) == []
    # tiny Qwen3 has 4 heads / 2 KV heads and 2 layers
    assert any("not a multiple of tensor_parallel" in p for p in problems(cfg, nproc=3))
    assert any("need 16 GPUs; 8 visible" in p for p in problems(cfg, nproc=16, gpus=8))


def test_missing_model_and_data_are_named(tmp_path, capsys):
    code = train_main([str(REPO / "configs/dapo17k_qwen3_4b.yaml"), "model.hf_path=/nonexistent", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 1
    assert "model.hf_path: /nonexistent has no config.json" in out


def test_cross_section_checks_and_unknown_keys():
    with pytest.raises(ConfigError, match="grpo.temperature .* must equal rollout.temperature"):
        load(RunConfig, REPO / "configs/tiny_cpu.yaml", ["grpo.temperature=0.5"])
    with pytest.raises(ConfigError, match="unknown key 'train.stpes'; did you mean 'steps'"):
        load(RunConfig, REPO / "configs/tiny_cpu.yaml", ["train.stpes=3"])
    assert train_main([str(REPO / "configs/tiny_cpu.yaml"), "rollout.nn=3", "--dry-run"]) == 2


QWEN3_4B = {"model_type": "qwen3", "vocab_size": 151936, "hidden_size": 2560, "intermediate_size": 9728,
            "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
            "rope_theta": 5000000, "rms_norm_eps": 1e-6, "max_position_embeddings": 262144,
            "tie_word_embeddings": True}  # Qwen3-4B-Instruct-2507's config.json (shape fields only)


@pytest.fixture
def qwen3_4b_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN3_4B))
    return tmp_path


@pytest.mark.parametrize("name", ["dapo17k_qwen3_4b", "workplace_assistant_qwen3_4b"])
def test_benchmark_configs_fit_80gb_with_margin(qwen3_4b_dir, name):
    from megagym.launch.dry_run import plan_memory

    cfg = load(RunConfig, REPO / "configs" / f"{name}.yaml", [f"model.hf_path={qwen3_4b_dir}"])
    plan = plan_memory(cfg, QWEN3_4B, nproc=8)
    assert plan.fits() and plan.device_bytes == 80 * 2**30
    assert plan.total <= 0.5 * plan.device_bytes  # the configs state a 46 GiB margin
    names = [t.name for t in plan.terms]
    assert any(n.startswith("activations (full") for n in names) and "logits (chunks of 4096)" in names


@pytest.mark.parametrize("overrides,term,knob", [
    (["parallel.recompute=none", "parallel.sequence_parallel=false"], "activations (none recompute)",
     "set parallel.recompute: full and parallel.sequence_parallel: true"),
    (["optim.logprob_chunk_tokens=0"], "logits (whole micro-batch)", "set optim.logprob_chunk_tokens"),
])
def test_a_config_that_cannot_fit_is_refused_naming_the_largest_term(qwen3_4b_dir, overrides, term, knob):
    cfg = load(RunConfig, REPO / "configs/dapo17k_qwen3_4b.yaml", [f"model.hf_path={qwen3_4b_dir}", *overrides])
    found = [p for p in problems(cfg, nproc=8) if p.startswith("memory plan")]
    assert len(found) == 1, found
    assert f"the largest term is {term}" in found[0] and knob in found[0] and "GPU has 80.0 GiB" in found[0]


def test_dry_run_prints_the_plan_and_a_budget_below_the_longest_sample(qwen3_4b_dir, capsys):
    code = train_main([str(REPO / "configs/dapo17k_qwen3_4b.yaml"), f"model.hf_path={qwen3_4b_dir}",
                       "optim.micro_batch_tokens=16384", "--dry-run", "--nproc", "8"])
    out = capsys.readouterr().out
    assert code == 1
    assert "memory plan per trainer rank (pipeline stage 0 of 1, TP 2, DP 4)" in out and "margin" in out
    assert "optim.micro_batch_tokens=16384 is smaller than the longest sample" in out
