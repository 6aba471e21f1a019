"""Units of `megagym eval` / `eval-merge` and `megagym cluster`: scoring, tables, GPU slices, run queries."""

from __future__ import annotations

import csv
import json

import pytest

from megagym.cluster import main as cluster_main
from megagym.launch.servers import gpu_slice
from megagym.eval import merge, merge_main
from megagym.rollout.validation import flat_metrics, score
from megagym.types import RolloutGroup, Sample


def _group(env, rewards, row=0):
    samples = [Sample(token_ids=[1, 2], loss_mask=[0, 1], gen_logprobs=[0.0, -1.0], reward=r, env=env,
                      group_index=row) for r in rewards]
    return RolloutGroup(row_index=row, env=env, samples=samples)


def test_score_counts_failed_rollouts_as_unsolved():
    groups = [_group("math", [1.0, 0.0, 1.0, 1.0]), _group("math", [0.0, 0.0], row=1)]  # 2 of 4 failed
    out = score(groups, val_n=4, threshold=1.0)
    assert out["prompts"] == 2 and out["samples"] == 6 and out["failed_rollouts"] == 2
    assert out["pass@1"] == pytest.approx(3 / 8)
    assert out["reward_mean"] == pytest.approx(3 / 6)
    assert out["environments"]["math"]["pass@1"] == pytest.approx(3 / 8)
    assert out["pass@4"] == out["environments"]["math"]["pass@4"] == pytest.approx(1 / 2)  # one prompt solved
    assert "pass@1" in score(groups, val_n=1, threshold=1.0) and "pass@4" not in score(groups, 1, 1.0)


def test_pass_at_n_counts_a_prompt_solved_by_any_sample_and_failures_as_unsolved():
    groups = [_group("math", [0.0, 1.0, 0.0, 0.0]), _group("math", [0.0], row=1),  # 3 failed, none solved
              _group("code", [], row=2), _group("code", [1.0, 1.0, 1.0, 1.0], row=3)]  # 4 failed | all solved
    out = score(groups, val_n=4, threshold=1.0)
    assert out["pass@4"] == pytest.approx(2 / 4) and out["failed_rollouts"] == 7
    assert out["environments"]["math"]["pass@4"] == pytest.approx(1 / 2)
    assert out["environments"]["code"]["pass@4"] == pytest.approx(1 / 2)
    assert out["environments"]["code"]["pass@1"] == pytest.approx(4 / 8)
    flat = flat_metrics(out)
    assert flat["val/pass@4"] == pytest.approx(0.5) and flat["val/pass@1"] == pytest.approx(5 / 16)
    assert flat["val/failed_rollouts"] == 7 and flat["val/code/failed_rollouts"] == 4
    assert flat["val/math/pass@4"] == pytest.approx(0.5) and flat["val/prompts"] == 4


def test_merge_writes_table_csv_and_plot(tmp_path):
    for i, (step, p) in enumerate([(20, 0.3), (10, 0.2)]):
        (tmp_path / f"result_{i}.json").write_text(json.dumps(
            {"checkpoint": f"/r/step_{step:08d}", "step": step, "run": "r", "prompts": 30, "val_n": 32,
             "samples": 960, "failed_rollouts": 0, "reward_mean": p, "pass@1": p}))
    assert merge_main([str(tmp_path), "--out", str(tmp_path / "summary")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "summary.csv")))
    assert [r["step"] for r in rows] == ["10", "20"] and rows[1]["pass@1"] == "0.3"
    assert "| 20 | /r/step_00000020 |" in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "summary.png").stat().st_size > 2000
    assert merge([tmp_path / "result_0.json"], tmp_path / "one")[2].exists()


def test_gpu_slice():
    assert gpu_slice("0,1,2,3,4,5,6,7", local=1, per_server=2, offset=4) == "6,7"
    assert gpu_slice("0,1", local=0, per_server=0, offset=0) == "0,1"
    with pytest.raises(RuntimeError):
        gpu_slice("0,1", local=1, per_server=2, offset=0)


def test_cluster_query(tmp_path, capsys):
    cfg = ["configs/tiny_cpu.yaml", f"run.output_dir={tmp_path / 'run'}", "train.steps=4"]
    for key, want in (("output_dir", str(tmp_path / "run")), ("latest_step", "0"), ("done", "0"),
                      ("latest", ""), ("checkpoint_dir", str(tmp_path / "run" / "checkpoints"))):
        assert cluster_main(["query", *cfg, "--get", key]) == 0
        assert capsys.readouterr().out.strip() == want, key
    ck = tmp_path / "run" / "checkpoints" / "step_00000004"
    ck.mkdir(parents=True)
    (ck / "trainer_state.json").write_text(json.dumps({"step": 4}))
    (ck / "COMPLETE").write_text("step 4\n")
    assert cluster_main(["query", *cfg, "--get", "done"]) == 0
    assert capsys.readouterr().out.strip() == "1"
    assert cluster_main(["query", *cfg, "--get", "steps", "--get", "latest_step"]) == 0
    assert capsys.readouterr().out.split("\n")[:2] == ["4", "4"]
    assert cluster_main(["query", *cfg, "--get", "nope"]) == 2
