"""The sections of a megagym run configuration and how they nest.

Owns: the top-level `RunConfig` that `megagym train` reads from YAML. Each section's dataclass
lives next to the code that uses it (`megagym/<package>/config.py`) and is only assembled here.
Must not: import anything heavy (torch, vLLM, megatron): config modules are plain dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from megagym.config.loader import build
from megagym.gym.config import GymConfig
from megagym.rollout.config import RolloutConfig, ValConfig
from megagym.server.config import ServerConfig
from megagym.trainer.config import CheckpointConfig, GRPOConfig, ModelConfig, OptimConfig, ParallelConfig


@dataclass
class RunSection:
    """Where a run writes and how it is seeded."""

    name: str = "run"
    output_dir: str = "runs/run"
    seed: int = 1234


@dataclass
class TrainSection:
    """The GRPO loop: how many steps, how many prompts each, and what happens between them.

    mode               "sync": generate with the current weights, then train; "one_step_off":
                       generation for step t+1 overlaps training of step t (samples one step stale,
                       corrected by truncated importance sampling against their generation logprobs);
                       "async": rollouts run continuously, a weight sync freezes in-flight
                       generations and they continue on the new weights (each token keeps the
                       version that generated it); a step trains on the first `prompts_per_step`
                       finished groups whose oldest token is at most `max_staleness` versions old
    max_staleness      async: how many weight versions behind the trainer a group's oldest token may
                       be; it also bounds the groups in flight (prompts_per_step x (1 + max_staleness))
    stale_groups       async: "drop" groups older than that (counted in async/dropped_stale_groups)
                       or "keep" them (trained with the importance-sampling correction)
    dynamic_sampling   drop groups whose rewards are all equal (no signal) and refill with new prompts,
                       at most `max_refill_rounds` times a step
    overlong_filter    leave truncated trajectories (stopped at max_output_tokens) out of the loss
    gym_restarts       times a run restarts a Gym stack that has a dead server and redoes the
                       batch (same prompts) before it stops
    """

    steps: int = 10
    prompts_per_step: int = 8
    mode: Literal["sync", "one_step_off", "async"] = "sync"
    max_staleness: int = 1
    stale_groups: Literal["drop", "keep"] = "drop"
    dynamic_sampling: bool = False
    max_refill_rounds: int = 2
    overlong_filter: bool = False
    gym_restarts: int = 2
    tensorboard: bool = True
    wandb_project: Optional[str] = None

    def validate(self) -> None:
        if self.steps < 0 or self.prompts_per_step < 1:
            raise ValueError("steps must be >= 0 and prompts_per_step >= 1")
        if self.max_refill_rounds < 0 or self.gym_restarts < 0:
            raise ValueError("max_refill_rounds >= 0 and gym_restarts >= 0 are required")
        if self.max_staleness < 0:
            raise ValueError(f"max_staleness: must be >= 0 (weight versions), got {self.max_staleness}")


@dataclass
class ServersSection:
    """The policy servers of a run.

    urls       servers already running (a Slurm script starts them): base URLs without /v1. Empty:
               `megagym train` starts `count` servers on this machine and stops them at the end.
    settings   `megagym serve` settings (megagym.server.config.ServerConfig fields, checked at
               load) for local servers, e.g. {kv_cache_gib: 1, max_model_len: 2048}; model,
               sampling and weight_sync are filled from the run. `settings.api_key` makes every
               server require that bearer key; the run then sends it everywhere (Gym's
               policy_api_key, weight sync, model lookup).
    """

    urls: list[str] = field(default_factory=list)
    count: int = 1
    weight_sync: Literal["shm", "nccl", "ipc"] = "shm"
    bucket_mb: int = 256
    settings: dict = field(default_factory=dict)
    start_timeout_s: float = 600.0
    sync_timeout_s: float = 600.0

    def validate(self) -> None:
        if self.count < 1 or self.bucket_mb < 1:
            raise ValueError("count and bucket_mb must be >= 1")
        # refused here, before anything starts, not by the first server: unknown keys, wrong types
        build(ServerConfig, {"model": "(the run's model)", **self.settings}, prefix="servers.settings")


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
    train: TrainSection = field(default_factory=TrainSection)
    val: ValConfig = field(default_factory=ValConfig)  # validation: when, how many, which sampling
    servers: ServersSection = field(default_factory=ServersSection)

    def validate(self) -> None:
        """Checks that span sections (each section checks itself when built)."""
        if abs(self.grpo.temperature - self.rollout.temperature) > 1e-9:
            raise ValueError(f"grpo.temperature ({self.grpo.temperature}) must equal rollout.temperature "
                             f"({self.rollout.temperature}): the trainer recomputes the sampled distribution")
        if self.rollout.top_p != 1.0:
            raise ValueError("rollout.top_p must be 1.0: the trainer's logprobs do not renormalise a nucleus")
        if self.train.mode == "async" and self.grpo.tis_threshold is None:
            raise ValueError("train.mode=async needs grpo.tis_threshold (truncated importance sampling): "
                             "async samples come from older weights, and tis_threshold: null turns the "
                             "correction off")
        key = self.servers.settings.get("api_key")
        if key:  # one source of truth: Gym's model proxy must send the servers' key
            if self.env.policy_api_key not in ("dummy", key):
                raise ValueError("env.policy_api_key differs from servers.settings.api_key: set only the latter")
            self.env.policy_api_key = str(key)
