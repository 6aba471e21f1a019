"""Gym's own `vllm_model` proxy (nemo-gym 0.7.0, training config) against the policy server.

Runs tests/server/gym_proxy_check.py with Gym's interpreter (`.venv-gym`, built by
scripts/setup_gym.sh); skipped when that venv is absent.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.gym, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
GYM_PY = ROOT / ".venv-gym" / "bin" / "python"


def test_gym_vllm_model_proxy_multi_turn(policy_server):
    if not GYM_PY.exists():
        pytest.skip("no .venv-gym (run scripts/setup_gym.sh)")
    r = subprocess.run(
        [str(GYM_PY), str(Path(__file__).with_name("gym_proxy_check.py")), policy_server.base_url,
         policy_server.model_path, "5"],
        capture_output=True, text=True, timeout=300, cwd=str(ROOT),
    )
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert r.returncode == 0 and lines, f"stdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    result = json.loads(lines[-1])
    assert result["ok"] and len(result["calls"]) == 5
