"""Validation: the one scorer, for training-time validation and `megagym eval` alike.

Owns: running `val.n` samples of every validation row with the validation sampling (`run`) and
scoring them (`score`): per environment and overall, the mean reward over finished samples, the
failed rollouts, pass@1 = solved samples / (prompts x n) and pass@n = prompts with at least one
solved sample / prompts. A rollout that failed (no sample came back) counts as unsolved in both,
so a flaky environment cannot raise the score; the failure count is reported beside them.
`flat_metrics` spells a score as `val/...` metric keys.
Must not: decide when to validate (the loop does) or start servers and Gym.
"""

from __future__ import annotations

import dataclasses

from megagym.rollout.config import RolloutConfig, ValConfig
from megagym.types import RolloutGroup


def rollout_config(rollout: RolloutConfig, val: ValConfig, progress: bool | None = None) -> RolloutConfig:
    """The rollout settings of validation: the run's, with the validation group size and sampling."""
    out = dataclasses.replace(rollout, n=val.n, temperature=val.temperature, top_p=val.top_p)
    return out if progress is None else dataclasses.replace(out, progress=progress)


async def run(manager, rows: list[dict]) -> list[RolloutGroup]:
    """All groups of the validation rows (row_index = position in `rows`), in completion order."""
    return [g async for g in manager.generate(rows, list(range(len(rows))))]


def score(groups: list[RolloutGroup], val_n: int, threshold: float) -> dict:
    """{prompts, samples, failed_rollouts, reward_mean, pass@1, pass@<val_n>, environments: {env: same}}."""
    per_env: dict[str, list[RolloutGroup]] = {}
    for g in groups:
        per_env.setdefault(g.env or "unknown", []).append(g)
    out = _summary(groups, val_n, threshold)
    out["environments"] = {name: _summary(gs, val_n, threshold) for name, gs in sorted(per_env.items())}
    return out


def _summary(groups: list[RolloutGroup], n: int, threshold: float) -> dict:
    rewards = [s.reward for g in groups for s in g.samples]
    solved = [sum(s.reward >= threshold for s in g.samples) for g in groups]
    prompts = len(groups)
    return {"prompts": prompts, "samples": len(rewards),
            "failed_rollouts": sum(max(0, n - len(g.samples)) for g in groups),
            "reward_mean": sum(rewards) / len(rewards) if rewards else 0.0,
            "pass@1": sum(solved) / (prompts * n) if prompts else 0.0,
            f"pass@{n}": sum(k > 0 for k in solved) / prompts if prompts else 0.0}


def flat_metrics(result: dict, prefix: str = "val/") -> dict[str, float]:
    """`score`'s result as metric keys: val/pass@1, val/pass@n, val/failed_rollouts, val/<env>/pass@1, ..."""
    keys = [k for k in result if k.startswith("pass@")] + ["failed_rollouts", "reward_mean"]
    out = {f"{prefix}{k}": result[k] for k in keys if result.get("samples") or k != "reward_mean"}
    out[f"{prefix}prompts"] = result["prompts"]
    for env, part in result.get("environments", {}).items():
        out.update({f"{prefix}{env}/{k}": part[k] for k in keys if k != "reward_mean"})
    return out
