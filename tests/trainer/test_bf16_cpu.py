"""bf16 on CPU: Megatron's mixed-precision path trains and exports bf16 weights."""

from __future__ import annotations

import math
import os
import subprocess
import sys

from ._common import REPO, read_json


def test_bf16_policy_on_cpu(tiny_qwen3, tmp_path):
    out = tmp_path / "bf16.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "MASTER_PORT", "LOCAL_RANK"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, str(REPO / "tests/trainer/worker_bf16.py"), str(tiny_qwen3), str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = read_json(out)
    assert r["logprob_diff_vs_fp32"] < 0.1  # bf16 weights/activations vs an fp32 reference
    assert r["export_dtypes"] == ["torch.bfloat16"]
    for m in r["metrics"]:
        assert math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) and m["update_ok"] == 1.0
