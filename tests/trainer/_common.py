"""Helpers shared by the trainer tests and their torchrun workers (config building, launching)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from megagym.server.process import free_port

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]  # the light worktree venv has no torchrun script


def make_cfg(hf_path, tp=1, pp=1, **sections):
    """A RunConfig for the tiny model; `sections` are {"optim": {...}, "grpo": {...}} overrides."""
    from megagym.config.loader import build
    from megagym.config.schema import RunConfig

    data = {"model": {"hf_path": str(hf_path)}, "parallel": {"tensor_parallel": tp, "pipeline_parallel": pp},
            "optim": {"lr": 1e-3, "micro_batch_tokens": 64}}
    for k, v in sections.items():
        data.setdefault(k, {}).update(v)
    if "temperature" in data.get("grpo", {}):  # the run config requires sampling == training temperature
        data.setdefault("rollout", {})["temperature"] = data["grpo"]["temperature"]
    return build(RunConfig, data)


def torchrun(worker: str, nproc: int, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """Run tests/trainer/<worker> under torchrun (gloo); raise with its output on failure."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false",
               PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    with tempfile.TemporaryDirectory(prefix="torchrun-") as logs:  # else torchrun leaves one in the temp dir
        cmd = [*TORCHRUN, f"--nproc-per-node={nproc}", f"--master-port={free_port()}", f"--log-dir={logs}",
               str(REPO / "tests" / "trainer" / worker), *args]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, start_new_session=True)
    if proc.returncode != 0:
        raise AssertionError(f"{worker} failed (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())
