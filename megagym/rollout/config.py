"""Typed settings of the rollout manager: the `rollout:` section of a run.

Owns: `RolloutConfig` — group size, concurrency, the sampling parameters stamped into every row,
per-request timeout, retry/back-off and what happens to a group with failed rollouts; `ValConfig`
— the `val:` section (when to validate, on how many rows, with which group size and sampling).
Must not: import anything heavy; this is plain data loaded by `megagym.config`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class RolloutConfig:
    n: int = 8  # rollouts per prompt (one GRPO group)
    max_concurrency: int = 32  # /run requests in flight across all groups
    # Sampling stamped into every row's responses_create_params (must match the policy server's
    # training sampling: the server rejects anything else as off-policy).
    temperature: float = 1.0
    top_p: float = 1.0
    max_output_tokens: int = 32
    # Failures: each /run is bounded; transport errors, timeouts and HTTP 5xx are retried with
    # exponential back-off, then the rollout is recorded as failed and left out of training.
    request_timeout_s: float = 120.0
    max_retries: int = 2
    backoff_s: float = 0.5
    backoff_max_s: float = 8.0
    # A group with failed rollouts keeps its successful samples (GRPO's baseline is then taken
    # over them) unless this is set, in which case the whole group is dropped.
    drop_group_on_failure: bool = False
    progress: bool = True  # a tqdm bar on stderr

    def validate(self) -> None:
        if self.n < 1:
            raise ValueError("n: at least one rollout per prompt")
        if self.max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        if self.max_output_tokens < 1:
            raise ValueError("max_output_tokens must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")
        if self.request_timeout_s <= 0 or self.max_retries < 0 or self.backoff_s < 0:
            raise ValueError("request_timeout_s > 0, max_retries >= 0 and backoff_s >= 0 are required")


@dataclass
class ValConfig:
    """Validation (the `val:` section), scored by `megagym.rollout.validation` in training and in
    `megagym eval`. The sampling pair is also the policy servers' accepted validation sampling.

    every              validate every this many steps (0: only before the first and after the last)
    limit              validation rows per environment (None: all)
    n                  samples per validation prompt: pass@1 is averaged over them, pass@n counts a
                       prompt solved when any of them is
    success_threshold  a sample with reward >= this counts as solved
    """

    every: int = 0
    before_training: bool = True
    limit: Optional[int] = None
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    success_threshold: float = 1.0

    def validate(self) -> None:
        if self.every < 0 or self.n < 1:
            raise ValueError("every >= 0 and n >= 1 are required")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")
