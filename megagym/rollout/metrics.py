"""Per-environment rollout metrics and the progress bar of a rollout batch.

Owns: `RolloutMetrics` — counts and means per environment over one batch (reward mean, success
rate, model calls per trajectory, generated and total tokens, truncation, masked samples, failures
and their reasons; model calls without a token-version record and trajectories split across
policy servers) flattened into `rollout/<env>/<name>` keys for the metrics logger; `Progress`,
a tqdm bar over the rollouts of a batch (stderr) that can be switched off.
Must not: decide what a failure is or touch the network.
"""

from __future__ import annotations

import dataclasses
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from megagym.types import Sample


@dataclass
class _EnvStats:
    rollouts: int = 0
    failures: int = 0
    rewards: list[float] = field(default_factory=list)
    successes: int = 0
    turns: int = 0
    gen_tokens: int = 0
    total_tokens: int = 0
    truncated: int = 0
    masked: int = 0
    failure_kinds: Counter = field(default_factory=Counter)


class RolloutMetrics:
    """Accumulates per-environment statistics of rollouts; `summary()` flattens them."""

    def __init__(self, success_threshold: float = 1.0):
        self.success_threshold = success_threshold
        self.envs: dict[str, _EnvStats] = defaultdict(_EnvStats)
        self.groups = 0
        self.seconds = 0.0
        self.looked_up = False
        self.unversioned_calls = 0  # model calls no policy server had a version record for
        self.split_rollouts = 0  # trajectories whose model calls were served by more than one server

    def add_sample(self, s: Sample) -> None:
        e = self.envs[s.env]
        e.rollouts += 1
        e.rewards.append(s.reward)
        e.successes += s.reward >= self.success_threshold
        e.turns += len(s.turn_starts)
        e.gen_tokens += s.num_generated
        e.total_tokens += len(s.token_ids)
        e.truncated += s.truncated
        e.masked += s.mask_sample

    def add_versions(self, call_versions: list | None, call_servers: list | None) -> None:
        """What the token-version lookup found for one trajectory (nothing when none was made)."""
        if call_versions is None:
            return
        self.looked_up = True
        self.unversioned_calls += sum(v is None for v in call_versions)
        self.split_rollouts += len({s for s in (call_servers or []) if s is not None}) > 1

    def merge(self, other: "RolloutMetrics") -> None:
        """Add `other`'s counts (another group's) to these."""
        for env, o in other.envs.items():
            e = self.envs[env]
            for f in dataclasses.fields(_EnvStats):
                mine, theirs = getattr(e, f.name), getattr(o, f.name)
                if isinstance(mine, list):
                    mine.extend(theirs)
                elif isinstance(mine, Counter):
                    mine.update(theirs)
                else:
                    setattr(e, f.name, mine + theirs)
        self.groups += other.groups
        self.looked_up |= other.looked_up
        self.unversioned_calls += other.unversioned_calls
        self.split_rollouts += other.split_rollouts

    def add_failure(self, env: str, reason: str) -> None:
        e = self.envs[env]
        e.rollouts += 1
        e.failures += 1
        e.failure_kinds[reason.split(":", 1)[0][:60]] += 1

    def summary(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for env, e in sorted(self.envs.items()):
            ok = len(e.rewards)
            p = f"rollout/{env or 'unknown'}/"
            out[p + "rollouts"] = e.rollouts
            out[p + "failures"] = e.failures
            if ok:
                out[p + "reward_mean"] = sum(e.rewards) / ok
                out[p + "success_rate"] = e.successes / ok
                out[p + "turns_mean"] = e.turns / ok
                out[p + "gen_tokens_mean"] = e.gen_tokens / ok
                out[p + "tokens_mean"] = e.total_tokens / ok
                out[p + "truncated_rate"] = e.truncated / ok
                out[p + "masked"] = e.masked
        all_ok = [r for e in self.envs.values() for r in e.rewards]
        out["rollout/rollouts"] = sum(e.rollouts for e in self.envs.values())
        out["rollout/failures"] = sum(e.failures for e in self.envs.values())
        if all_ok:
            out["rollout/reward_mean"] = sum(all_ok) / len(all_ok)
        out["rollout/groups"] = self.groups
        if self.looked_up:
            out["rollout/version_lookup_failures"] = self.unversioned_calls
            out["rollout/split_server_rollouts"] = self.split_rollouts
        if self.seconds > 0:
            out["rollout/seconds"] = self.seconds
            out["rollout/rollouts_per_s"] = out["rollout/rollouts"] / self.seconds
        return out

    def failure_reasons(self) -> dict[str, dict[str, int]]:
        return {env: dict(e.failure_kinds) for env, e in self.envs.items() if e.failure_kinds}


class Progress:
    """A tqdm bar over rollouts (or nothing when disabled or tqdm is missing)."""

    def __init__(self, total: int, enabled: bool = True, desc: str = "rollouts"):
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=False)
            except ImportError:
                self.bar = None
        self.failures = 0
        self.rewards: list[float] = []

    def update(self, reward: float | None) -> None:
        if reward is None:
            self.failures += 1
        else:
            self.rewards.append(reward)
        if self.bar is not None:
            mean = sum(self.rewards) / len(self.rewards) if self.rewards else float("nan")
            self.bar.set_postfix(reward=f"{mean:.3f}", failed=self.failures, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
