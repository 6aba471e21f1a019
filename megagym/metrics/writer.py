"""Write per-step metrics a person can plot.

Owns: appending one JSON object per step to `<run_dir>/metrics.jsonl` (flushed every write, so
a crash loses nothing already logged), mirroring the same scalars to TensorBoard and, when
configured, to Weights & Biases. Must not: compute metrics; callers pass plain numbers.

Key names are `group/name` (for example `train/reward_mean`, `val/reward_mean`,
`time/generation`); `megagym plot` reads the JSONL back.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool):
            value = float(value)
        if isinstance(value, (int, float)) and math.isfinite(float(value)):
            out[key] = float(value)
    return out


class MetricsWriter:
    """`log(step, metrics)` appends to metrics.jsonl and mirrors scalars to TensorBoard / W&B."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, wandb_project: str | None = None,
                 run_name: str | None = None, config: dict | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        self._wandb = None
        if wandb_project:
            import wandb  # optional dependency, only when configured

            self._wandb = wandb.init(project=wandb_project, name=run_name, config=config or {},
                                     dir=str(self.run_dir))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": int(step), "time": time.time(), **metrics}
        self._file.write(json.dumps(record, default=float) + "\n")
        self._file.flush()
        scalars = _scalars(metrics)
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """All records of `<run_dir>/metrics.jsonl`; a torn last line (crash mid-write) is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
