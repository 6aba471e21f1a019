"""The typed boundary between rollouts and training.

Owns: `Sample`, the one record that crosses from the rollout side (Gym trajectories) to the
trainer, and `RolloutGroup`, the n samples of one prompt. Must not: import torch, vLLM,
megatron or nemo_gym; this module is plain data so every side can import it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Sample:
    """One trajectory as a flat token sequence.

    token_ids     every token the model saw or produced, in order (prompt, actions, tool outputs)
    loss_mask     1 on tokens the policy generated, 0 elsewhere
    gen_logprobs  logprob the sampling policy gave each generated token (0.0 where loss_mask==0)
    turn_starts   index in token_ids where each model call's generation begins
    row_index     the dataset row the prompt came from
    group_index   the GRPO group within its training batch: samples with the same id share a
                  baseline. A batch may hold one row twice (its prompts cross an epoch), so the
                  batch numbers its groups (`rollout.batches`); until then it is the row index.
    weight_version  the oldest weight version any of its generated tokens came from
    token_versions  the weight version of each token (aligned with token_ids; -1 where loss_mask==0);
                  empty when every generated token came from `weight_version` (a generation that
                  spans an in-flight weight update has several: megagym.token_versions)
    (A rollout that failed yields no Sample: its reason is in `RolloutGroup.failures`.)
    """

    token_ids: list[int]
    loss_mask: list[int]
    gen_logprobs: list[float]
    reward: float
    group_index: int = 0
    row_index: int = 0
    env: str = ""
    turn_starts: list[int] = field(default_factory=list)
    truncated: bool = False
    mask_sample: bool = False
    weight_version: int = 0
    advantage: float = 0.0
    token_versions: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.token_ids)
        if len(self.loss_mask) != n or len(self.gen_logprobs) != n:
            raise ValueError(
                f"sample of row {self.row_index}: token_ids ({n}), loss_mask "
                f"({len(self.loss_mask)}) and gen_logprobs ({len(self.gen_logprobs)}) differ in length"
            )
        if self.token_versions and len(self.token_versions) != n:
            raise ValueError(f"sample of row {self.row_index}: token_versions ({len(self.token_versions)}) "
                             f"and token_ids ({n}) differ in length")

    def generated_versions(self) -> list[int]:
        """The weight version of each generated token, in order."""
        if not self.token_versions:
            return [self.weight_version] * self.num_generated
        return [v for v, m in zip(self.token_versions, self.loss_mask) if m]

    @property
    def num_generated(self) -> int:
        return sum(self.loss_mask)


@dataclass
class RolloutGroup:
    """The samples generated for one prompt row (GRPO's group)."""

    row_index: int
    env: str
    samples: list[Sample]
    failures: list[str] = field(default_factory=list)

    @property
    def rewards(self) -> list[float]:
        return [s.reward for s in self.samples]
