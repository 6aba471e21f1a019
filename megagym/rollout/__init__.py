"""Rollouts: Gym rows -> groups of trajectories -> training samples, streamed in completion order.

`manager.py` schedules and streams, `trajectory.py` turns one trajectory into a `Sample` (with the
contiguity check), `metrics.py` keeps per-environment statistics and the progress bar.
`RolloutManager` and `stamp_row` load on first use: the run config imports `rollout.config`, and
the Megatron trainer run alone must not need the manager's HTTP client (tests/trainer/test_bare_gpu_machine.py).
"""

from megagym.rollout.config import RolloutConfig
from megagym.rollout.trajectory import ContiguityError, TrajectoryError, trajectory_to_sample

__all__ = ["ContiguityError", "RolloutConfig", "RolloutManager", "TrajectoryError", "stamp_row",
           "trajectory_to_sample"]


def __getattr__(name: str):
    if name in ("RolloutManager", "stamp_row"):
        from megagym.rollout import manager

        return getattr(manager, name)
    raise AttributeError(f"module 'megagym.rollout' has no attribute {name!r}")
