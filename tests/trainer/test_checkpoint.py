"""A crash during save never leaves something that loads as a checkpoint; the last good one stays."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ._common import REPO


def test_crash_during_save_leaves_last_good_checkpoint(tiny_qwen3, tmp_path):
    from megagym.trainer.checkpoint import is_complete, latest_checkpoint, read_state

    root = tmp_path / "ckpts"
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "MASTER_PORT", "LOCAL_RANK"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, str(REPO / "tests/trainer/worker_crash_save.py"), str(tiny_qwen3),
                           str(root)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 17, proc.stderr[-4000:]
    entries = sorted(p.name for p in root.iterdir())
    assert "step_00000001" in entries and "step_00000002" not in entries
    partial = [root / n for n in entries if n.startswith(".tmp-step_00000002")]
    assert len(partial) == 1 and (partial[0] / "dist").is_dir()
    assert not is_complete(partial[0])
    with pytest.raises(FileNotFoundError):
        read_state(partial[0])
    good = latest_checkpoint(root)
    assert good is not None and good.name == "step_00000001"
    state = read_state(good)
    assert state["step"] == 1 and state["extra_state"] == {"data_position": 1}
    assert (good / "hf" / "config.json").exists() and (good / "rng" / "rank_00000.pt").exists()
