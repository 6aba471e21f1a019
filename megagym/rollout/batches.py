"""Training batches for the GRPO loop: which prompts come next and the groups generated for them.

Owns (rank 0 only): the resumable prompt cursor over the training rows, one step's collection of
groups (with DAPO-style dynamic sampling: groups whose rewards are all equal carry no signal and
are replaced by new prompts, a bounded number of times), prefetching the next batch in a
background thread for the one-step-off mode, handing async mode to `stream.RolloutStream`, and
validation rollouts (scored by `validation.py`). A collected batch is put in one order (groups in
the cursor's order, a group's samples by their token IDs), not the order rollouts finished in, so
that with per-request seeds (`request_seeds` of the policy server) a run repeats bit for bit.
Must not: touch the model or weights; the loop decides when weights change, and it must wait
for a prefetch to finish before it changes them (no trajectory may span two weight versions).

Weight versions: Gym's model proxy does not pass the policy servers' `weight_version` through to
the agent's answer, so the rollout manager looks each model call's per-token versions up on the
policy servers afterwards (megagym.token_versions). Where no server has the record the samples are
stamped from `weight_version`, which the loop sets to the version the servers acknowledged after
each sync; in the sync and one-step-off modes that is exact too, because the weights never change
while a batch is being collected (the loop waits for a prefetch before it syncs).

A Gym server that has died makes every later rollout through it fail, so a batch never goes on
without it: `next()` and `validate()` raise `GymDied` (checked before prompts are taken and after
any round with failures) and leave the cursor where the batch began; the loop then restarts Gym,
calls `rebind(new_stack)` and asks again, so the same prompts are redone.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from megagym.data.dataset import PromptCursor
from megagym.gym.rows import load_env_rows
from megagym.rollout import validation
from megagym.rollout.manager import RolloutManager
from megagym.rollout.stream import RolloutStream
from megagym.types import RolloutGroup


@dataclass
class Batch:
    groups: list[RolloutGroup]
    cursor_state: dict  # the cursor right after this batch's prompts were taken
    seconds: float
    metrics: dict = field(default_factory=dict)
    trainer_version: int = 0  # the weights the batch is trained from (what the servers served when it was taken)

    @property
    def samples(self):
        return [s for g in self.groups for s in g.samples]


class GymDied(RuntimeError):
    """A Gym server of the run is dead; the training batch cannot be trusted."""


class BatchSource:
    def __init__(self, cfg, stack):
        self.cfg = cfg
        self.stack = stack
        self.rows = load_env_rows(cfg.env, "train")
        self.cursor = PromptCursor(len(self.rows), seed=cfg.run.seed)
        self.rebind(stack)
        try:
            self.val_rows = load_env_rows(cfg.env, "validation", limit=cfg.val.limit)
        except ValueError:
            self.val_rows = []
        self.weight_version = int(cfg.servers.settings.get("initial_weight_version", 0))  # what the servers serve
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="megagym-rollouts")
        self._pending: Future | None = None
        self.stream = RolloutStream(self.manager, self.rows, self.cursor, cfg.train, self._check_gym, GymDied) \
            if cfg.train.mode == "async" else None

    @property
    def weight_version(self) -> int:
        """The version the policy servers serve (set by the loop after each sync)."""
        return self._weight_version

    @weight_version.setter
    def weight_version(self, version: int) -> None:
        self._weight_version = int(version)
        self.manager.weight_version = self._weight_version  # async: the stamp of rollouts starting now

    def rebind(self, stack) -> None:
        """Send rollouts to `stack` (a restarted Gym) from now on."""
        cfg = self.cfg
        self.stack = stack
        servers = dict(policy_servers=cfg.servers.urls, api_key=cfg.servers.settings.get("api_key"))
        self.manager = RolloutManager(cfg.rollout, stack, **servers)
        self.manager.weight_version = getattr(self, "_weight_version", 0)
        self.val_manager = RolloutManager(validation.rollout_config(cfg.rollout, cfg.val), stack,
                                          success_threshold=cfg.val.success_threshold, **servers)
        if getattr(self, "stream", None) is not None:
            self.stream.restart(self.manager)

    # ------------------------------------------------------------------ training batches
    def _collect(self) -> Batch:
        t = self.cfg.train
        t0 = time.monotonic()
        groups: list[RolloutGroup] = []
        dropped = failures = 0
        need, rounds = t.prompts_per_step, 0
        metrics: dict = {}
        self._check_gym()
        self.manager.weight_version = self.weight_version  # the weights cannot change until this batch is done
        start = self.cursor.state_dict()
        while True:
            idx = self.cursor.take(need)
            got = asyncio.run(self._gather([self.rows[i] for i in idx], idx))
            got.sort(key=lambda g: idx.index(g.row_index))  # the cursor's order, not the finishing order
            for g in got:  # one order of a group's samples, whichever rollout finished or drew first
                g.samples.sort(key=lambda s: s.token_ids)
            metrics = _merge_counts(metrics, self.manager.metrics.summary())
            if any(g.failures for g in got):
                try:
                    self._check_gym()
                except GymDied:
                    self.cursor.load_state_dict(start)  # the batch is redone from its first prompt
                    raise
            for g in got:
                failures += len(g.failures)
                rewards = g.rewards
                if not g.samples:
                    continue
                if t.dynamic_sampling and max(rewards) - min(rewards) < 1e-12:
                    dropped += 1
                    continue
                groups.append(g)
            if not t.dynamic_sampling or len(groups) >= t.prompts_per_step or rounds >= t.max_refill_rounds:
                break
            need, rounds = t.prompts_per_step - len(groups), rounds + 1
        for group_id, g in enumerate(groups):  # one baseline per group, even for a row taken twice
            for s in g.samples:
                s.group_index = group_id
        metrics.update({"batch/groups": len(groups), "batch/dropped_equal_reward": dropped,
                        "batch/refill_rounds": rounds, "batch/failed_rollouts": failures})
        return Batch(groups, self.cursor.state_dict(), time.monotonic() - t0, metrics)

    def _check_gym(self) -> None:
        dead = self.stack.dead_servers()
        if dead:
            why = "; ".join(f"{name}: {reason}" for name, reason in sorted(dead.items()))
            raise GymDied(f"Gym server(s) died ({why})")

    async def _gather(self, rows, idx) -> list[RolloutGroup]:
        return [g async for g in self.manager.generate(rows, idx)]

    def prefetch(self) -> None:
        """Start collecting the next batch in the background (one-step-off mode)."""
        if self._pending is None:
            self._pending = self._pool.submit(self._collect)

    def wait_prefetch(self) -> None:
        """Block until a running prefetch has finished (before weights change)."""
        if self._pending is not None:
            self._pending.exception()

    def next(self) -> Batch:
        """Async: the stream's next groups; else the prefetched batch if there is one, else a batch
        collected now."""
        batch = self._next()
        batch.trainer_version = self.weight_version
        return batch

    def _next(self) -> Batch:
        if self.stream is not None:
            t0 = time.monotonic()
            groups, metrics = self.stream.take(self.cfg.train.prompts_per_step, self.weight_version)
            for group_id, g in enumerate(groups):
                for s in g.samples:
                    s.group_index = group_id
            metrics["batch/groups"] = len(groups)
            return Batch(groups, {}, time.monotonic() - t0, metrics)
        if self._pending is not None:
            pending, self._pending = self._pending, None
            return pending.result()
        return self._collect()

    # ------------------------------------------------------------------ validation
    def validate(self) -> dict:
        if not self.val_rows:
            return {}
        self._check_gym()
        t0 = time.monotonic()
        groups = asyncio.run(validation.run(self.val_manager, self.val_rows))
        if any(g.failures for g in groups):
            self._check_gym()
        out = {f"val/{k.split('/', 1)[1]}": v for k, v in self.val_manager.metrics.summary().items()}
        out.update(validation.flat_metrics(validation.score(groups, self.cfg.val.n, self.cfg.val.success_threshold)))
        out["time/validation"] = time.monotonic() - t0
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self, cursor_after_last_batch: dict | None = None) -> dict:
        """What a checkpoint keeps: the cursor right after the last trained batch; async: the
        stream's snapshot (cursor, rows still running, finished groups not yet trained)."""
        if self.stream is not None:
            return self.stream.state_dict()
        return {"cursor": cursor_after_last_batch or self.cursor.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.stream is not None:
            self.stream.load_state_dict(state)
        else:
            self.cursor.load_state_dict(state["cursor"])

    def close(self) -> None:
        if self.stream is not None:
            self.stream.stop()
        self._pool.shutdown(wait=True, cancel_futures=True)


def _merge_counts(acc: dict, new: dict) -> dict:
    """Refill rounds: add up counters, keep the latest means."""
    out = dict(acc)
    for k, v in new.items():
        counter = k.endswith(("rollouts", "failures", "groups", "masked", "seconds"))
        out[k] = out.get(k, 0) + v if counter else v
    return out
