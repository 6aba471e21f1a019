"""Rollouts: Gym rows -> groups of trajectories -> training samples, streamed in completion order.

`manager.py` schedules and streams, `trajectory.py` turns one trajectory into a `Sample` (with the
contiguity check), `metrics.py` keeps per-environment statistics and the progress bar.
"""

from megagym.rollout.config import RolloutConfig
from megagym.rollout.manager import RolloutManager, stamp_row
from megagym.rollout.trajectory import ContiguityError, TrajectoryError, trajectory_to_sample

__all__ = ["ContiguityError", "RolloutConfig", "RolloutManager", "TrajectoryError", "stamp_row",
           "trajectory_to_sample"]
