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
