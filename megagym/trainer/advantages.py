"""GRPO advantages: each sample's reward against the other samples of its prompt group.

Owns: turning rewards grouped by `Sample.group_index` into one scalar advantage per sample
(reward minus the group mean, or minus the mean of the *other* samples with leave-one-out,
optionally divided by the group's reward standard deviation). Pure python/torch; no megatron.
Must not: touch token-level quantities (the loss broadcasts the advantage over generated tokens).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch


def group_advantages(rewards: torch.Tensor, normalize_std: bool = True, leave_one_out: bool = False,
                     eps: float = 1e-6) -> torch.Tensor:
    """Advantages for the rewards of ONE group (1-D tensor)."""
    r = rewards.double()
    n = r.numel()
    if n == 0:
        return r.float()
    if leave_one_out and n > 1:
        baseline = (r.sum() - r) / (n - 1)
    else:
        baseline = r.mean().expand(n)
    adv = r - baseline
    if normalize_std and n > 1:
        adv = adv / (r.std(unbiased=True) + eps)
    elif normalize_std:
        adv = adv * 0.0
    return adv.float()


def compute_advantages(rewards: Sequence[float], groups: Sequence[int], normalize_std: bool = True,
                       leave_one_out: bool = False, eps: float = 1e-6) -> list[float]:
    """One advantage per sample; samples with the same group id form a group."""
    if len(rewards) != len(groups):
        raise ValueError(f"{len(rewards)} rewards but {len(groups)} group ids")
    members: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    out = [0.0] * len(rewards)
    for idx in members.values():
        adv = group_advantages(torch.tensor([float(rewards[i]) for i in idx]), normalize_std, leave_one_out, eps)
        for i, a in zip(idx, adv.tolist()):
            out[i] = a
    return out


def assign_advantages(samples, normalize_std: bool = True, leave_one_out: bool = False, eps: float = 1e-6) -> None:
    """Set `sample.advantage` in place for a list of `megagym.types.Sample`."""
    adv = compute_advantages([s.reward for s in samples], [s.group_index for s in samples],
                             normalize_std, leave_one_out, eps)
    for s, a in zip(samples, adv):
        s.advantage = a
