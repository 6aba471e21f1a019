"""The sections of a megagym run configuration and how they nest.

Owns: the top-level `RunConfig` that `megagym train` reads from YAML. Each section's dataclass
lives next to the code that uses it (`megagym/<package>/config.py`) and is only assembled here.
Must not: import anything heavy (torch, vLLM, megatron): config modules are plain dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megagym.gym.config import GymConfig
from megagym.rollout.config import RolloutConfig
from megagym.trainer.config import CheckpointConfig, GRPOConfig, ModelConfig, OptimConfig, ParallelConfig


@dataclass
class RunSection:
    """Where a run writes and how it is seeded."""

    name: str = "run"
    output_dir: str = "runs/run"
    seed: int = 1234


@dataclass
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    env: GymConfig = field(default_factory=GymConfig)  # the Gym environments and how Gym is launched
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    # Sections are added here as the packages that own them land:
    #   server  -> megagym.server.config.ServerConfig
