"""Asynchronous GRPO's rollout side: groups generated continuously, handed to the trainer by age.

Owns (rank 0, `train.mode: async`): a background thread with its own event loop that keeps
rollout groups running against the policy servers — prompts from the shared seeded cursor, at most
`prompts_per_step x (1 + max_staleness)` groups in flight or finished and waiting, less the groups
the trainer has already taken under the current weights (so a group starts only if its turn comes
while it is at most `max_staleness` versions old; without that, groups started while a batch trains
go stale and are thrown away) — and the buffer of finished groups. `take()` gives the trainer the
oldest `prompts_per_step` finished groups whose oldest token is at most `max_staleness` weight
versions behind it; older groups are dropped (counted) or, with `stale_groups: keep`, trained
anyway. Dynamic sampling drops equal-reward groups as they finish and the next prompt takes their
place. The weights change under running
generations (the servers freeze them, swap, resume): every token carries the version that made
it, looked up by the rollout manager.

Nothing is lost or trained twice across a crash: `state_dict()` is one consistent snapshot of the
cursor, the rows of groups still running (they are run again after a resume) and the finished
groups not yet trained (trained after a resume), taken under the same lock that moves rows and
groups between those three places.

A dead Gym server ends production: the rows of the group that failed and of every group still
running go back to the front of the queue and `take()` raises `GymDied`; after the loop restarts
Gym, `restart(manager)` continues with the same queue and the finished groups.
Must not: touch the model or weights, or decide when they change (the loop does).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
from typing import Callable

from megagym.rollout.metrics import RolloutMetrics
from megagym.types import RolloutGroup, Sample


class RolloutStream:
    def __init__(self, manager, rows: list[dict], cursor, train_cfg, check_gym: Callable[[], None],
                 gym_died: type[Exception]):
        self.manager = manager
        self.rows = rows
        self.cursor = cursor
        self.cfg = train_cfg
        self.check_gym = check_gym  # raises `gym_died` when a Gym server of the run is dead
        self.gym_died = gym_died
        self.capacity = train_cfg.prompts_per_step * (1 + train_cfg.max_staleness)
        self._version: int | None = None  # the trainer's weights at the last take()
        self._taken_at_version = 0  # groups taken under those weights
        self._cond = threading.Condition()
        self._ready: list[RolloutGroup] = []
        self._running: dict[int, int] = {}  # task id -> row index
        self._queue: list[int] = []  # rows to run before new ones from the cursor (resume, Gym death)
        self._error: BaseException | None = None
        self._stop = False
        self._thread: threading.Thread | None = None
        self.metrics = RolloutMetrics(manager.success_threshold)
        self.counts = {"dropped_stale_groups": 0, "dropped_equal_reward": 0, "failed_rollouts": 0,
                       "empty_groups": 0}

    # ------------------------------------------------------------------ trainer side
    def take(self, n: int, trainer_version: int) -> tuple[list[RolloutGroup], dict]:
        """The next `n` groups young enough for weights `trainer_version` (blocks until there are)."""
        self._ensure_started()
        t = self.cfg
        with self._cond:
            if trainer_version != self._version:  # the servers have these weights now
                self._version, self._taken_at_version = trainer_version, 0
                self._cond.notify_all()
            while True:
                if self._error is not None:
                    raise self._error
                kept = []
                for g in self._ready:
                    age = trainer_version - min(s.weight_version for s in g.samples)
                    if age > t.max_staleness and t.stale_groups == "drop":
                        self.counts["dropped_stale_groups"] += 1
                    else:
                        kept.append(g)
                self._ready = kept
                if len(self._ready) >= n:
                    groups, self._ready = self._ready[:n], self._ready[n:]
                    self._taken_at_version += n
                    self._cond.notify_all()  # room for new rollouts
                    break
                self._cond.wait(0.5)
            metrics = {f"async/{k}": v for k, v in self.counts.items()}
            metrics.update({"async/groups_waiting": len(self._ready), "async/groups_running": len(self._running),
                            "async/start_budget": self._room()})
            metrics.update(self.metrics.summary())
            self.metrics = RolloutMetrics(self.manager.success_threshold)
        return groups, metrics

    def state_dict(self) -> dict:
        """Cursor, rows to run again, finished groups (JSON text, one line in the checkpoint)."""
        with self._cond:
            return {"cursor": self.cursor.state_dict(),
                    "requeue": self._queue + sorted(self._running.values()),
                    "ready": json.dumps([dataclasses.asdict(g) for g in self._ready])}

    def load_state_dict(self, state: dict) -> None:
        with self._cond:
            self.cursor.load_state_dict(state["cursor"])
            self._queue = [int(i) for i in state.get("requeue", [])]
            self._ready = [_group_from_dict(d) for d in json.loads(state.get("ready") or "[]")]

    def restart(self, manager) -> None:
        """Continue with `manager` (a restarted Gym's) after a `GymDied`."""
        self.stop()
        with self._cond:
            self.manager, self._error, self._stop = manager, None, False

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    # ------------------------------------------------------------------ the producer
    def _ensure_started(self) -> None:
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=lambda: asyncio.run(self._produce()),
                                            name="megagym-async-rollouts", daemon=True)
            self._thread.start()

    def _room(self) -> int:
        """How many more groups may start now (under the lock).

        A group that starts now runs under the weights the trainer last took a batch with (or newer);
        the groups ahead of it (running, waiting) are taken first, `prompts_per_step` per step, so it
        is trained within `max_staleness` versions only if fewer than capacity minus what the
        trainer already took under those weights are ahead of it."""
        return self.capacity - self._taken_at_version - len(self._ready) - len(self._running)

    def _next_row(self) -> int:
        """A row to run (under the lock): queued ones first, then the cursor's."""
        if self._queue:
            return self._queue.pop(0)
        return self.cursor.take(1)[0]

    async def _produce(self) -> None:
        manager = self.manager
        sem = asyncio.Semaphore(manager.cfg.max_concurrency)
        tasks: dict[asyncio.Task, tuple[int, RolloutMetrics]] = {}
        try:
            async with manager.client() as client:
                while True:
                    with self._cond:
                        if self._stop:
                            break
                        while self._room() > 0:
                            row = self._next_row()
                            m = RolloutMetrics(manager.success_threshold)
                            task = asyncio.create_task(manager.run_group(client, sem, self.rows[row], row, m))
                            tasks[task] = (row, m)
                            self._running[id(task)] = row
                    if not tasks:
                        await asyncio.sleep(0.1)
                        continue
                    done, _ = await asyncio.wait(tasks, timeout=0.2, return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        row, metrics = tasks.pop(task)
                        group = task.result()  # a ContiguityError (a bug) ends production
                        if group.failures:
                            self.counts["failed_rollouts"] += len(group.failures)
                            try:
                                await asyncio.to_thread(self.check_gym)
                            except self.gym_died:
                                with self._cond:
                                    self._running.pop(id(task), None)
                                    self._queue.insert(0, row)
                                raise
                        self._finished(id(task), group, metrics)
        except BaseException as e:  # noqa: BLE001 - handed to the trainer thread
            with self._cond:
                if not self._stop:
                    self._error = e
            await self._cancel(tasks)
            if not isinstance(e, Exception):
                raise
        else:
            await self._cancel(tasks)

    async def _cancel(self, tasks: dict) -> None:
        """Cancel what still runs; its rows go back to the queue (nothing of them is trained)."""
        with self._cond:
            for task, (row, _) in tasks.items():
                task.cancel()
                if self._running.pop(id(task), None) is not None:
                    self._queue.append(row)
            self._cond.notify_all()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _finished(self, task_id: int, group: RolloutGroup, metrics: RolloutMetrics) -> None:
        rewards = group.rewards
        with self._cond:
            self._running.pop(task_id, None)
            self.metrics.merge(metrics)
            if not group.samples:
                self.counts["empty_groups"] += 1
            elif self.cfg.dynamic_sampling and max(rewards) - min(rewards) < 1e-12:
                self.counts["dropped_equal_reward"] += 1
            else:
                self._ready.append(group)
            self._cond.notify_all()


def _group_from_dict(d: dict) -> RolloutGroup:
    d = dict(d)
    d["samples"] = [Sample(**s) for s in d["samples"]]
    return RolloutGroup(**d)


def staleness(samples: list[Sample], trainer_version: int) -> dict:
    """How far behind the trainer's weights a batch's generated tokens are (in weight versions)."""
    behind = [trainer_version - v for s in samples for v in s.generated_versions()]
    if not behind:
        return {}
    return {"batch/staleness_max": max(behind), "batch/staleness_mean": sum(behind) / len(behind),
            "batch/old_token_share": sum(b > 0 for b in behind) / len(behind),
            "batch/weight_versions": len({v for s in samples for v in s.generated_versions()})}

