"""Metrics JSONL round trip, TensorBoard mirror, and `megagym plot` output."""

import json

from megagym.cli import main as cli_main
from megagym.metrics import MetricsWriter, read_metrics
from megagym.metrics.plot import _expand


def test_jsonl_roundtrip_and_torn_line(tmp_path):
    with MetricsWriter(tmp_path) as w:
        for step in range(3):
            w.log(step, {"train/reward_mean": 0.1 * step, "time/generation": 1.0, "note": "x"})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "train/rew')  # a crash mid-write
    recs = read_metrics(tmp_path)
    assert [r["step"] for r in recs] == [0, 1, 2]
    assert recs[2]["train/reward_mean"] == 0.2 and recs[0]["note"] == "x"
    assert any((tmp_path / "tensorboard").iterdir())


def test_plot_writes_pngs(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        for step in range(4):
            w.log(step, {"rollout/reward_mean": step / 4, "train/gen_k3": 1e-4, "time/generation": 2.0,
                         "time/training": 1.0, "time/sync": 0.2})
        w.log(4, {"val/reward_mean": 0.8, "val/math/pass@1": 0.5, "val/math/pass@4": 0.7, "train/entropy": 0.9})
    assert cli_main(["plot", str(tmp_path)]) == 0
    pngs = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert pngs == ["entropy.png", "gen_kl.png", "reward.png", "step_time.png", "validation.png",
                    "validation_by_env.png"]
    assert _expand(["val/*/pass@*"], read_metrics(tmp_path)) == ["val/math/pass@1", "val/math/pass@4"]
    for name in pngs:
        data = (tmp_path / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["val/reward_mean"] == 0.8
