"""Async GRPO's rollout stream without servers: age filtering, the in-flight bound, the resume
snapshot and a Gym death, over a scripted stand-in for the rollout manager (the real manager and
servers run in tests/e2e/test_train_async.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from types import SimpleNamespace

import pytest

from megagym.data.dataset import PromptCursor
from megagym.rollout.stream import RolloutStream, staleness
from megagym.types import RolloutGroup, Sample


class GymDiedForTest(RuntimeError):
    pass


class ScriptedManager:
    """Stands in for RolloutManager.run_group: each group takes `delay_s`, its samples carry the
    manager's current `weight_version`, and rewards come from `reward_of(row)`."""

    success_threshold = 1.0

    def __init__(self, delay_s=0.01, reward_of=lambda row: [0.0, 1.0], fail_rows=()):
        self.cfg = SimpleNamespace(max_concurrency=64)
        self.weight_version = 0
        self.delay_s = delay_s
        self.reward_of = reward_of
        self.fail_rows = set(fail_rows)
        self.started: list[int] = []
        self.running = 0
        self.max_running = 0

    @contextlib.asynccontextmanager
    async def client(self):
        yield None

    async def run_group(self, client, sem, row, row_index, metrics, progress=None):
        self.started.append(row_index)
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        version = self.weight_version
        try:
            await asyncio.sleep(self.delay_s)
        finally:
            self.running -= 1
        if row_index in self.fail_rows:
            return RolloutGroup(row_index, "env", [], failures=["gym server dead"])
        samples = [Sample([1, 2, 3], [0, 1, 1], [0.0, -1.0, -1.0], reward=r, row_index=row_index,
                          weight_version=version) for r in self.reward_of(row_index)]
        return RolloutGroup(row_index, "env", samples)


def _wait(condition, what: str, timeout_s: float = 30.0) -> None:
    """Poll `condition` until it holds (no assumption about how fast the machine is)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _train_cfg(**kw):
    base = dict(prompts_per_step=2, max_staleness=1, stale_groups="drop", dynamic_sampling=False)
    base.update(kw)
    return SimpleNamespace(**base)


def _stream(manager, check_gym=lambda: None, **kw):
    rows = [{"i": i} for i in range(50)]
    return RolloutStream(manager, rows, PromptCursor(len(rows), seed=3), _train_cfg(**kw), check_gym, GymDiedForTest)


def test_take_bounds_in_flight_and_drops_groups_older_than_max_staleness():
    mgr = ScriptedManager(delay_s=0.02)
    s = _stream(mgr)
    try:
        groups, m = s.take(2, trainer_version=0)
        assert len(groups) == 2 and m["async/dropped_stale_groups"] == 0
        # prompts_per_step x (1 + max_staleness) = 4, less the 2 taken under version 0: two more
        # start, not four (those would be 2 versions old by their turn)
        _wait(lambda: len(s._ready) >= 2, "two version-0 groups waiting")
        assert mgr.max_running <= 4 and len(mgr.started) == 4 and s._room() == 0
        mgr.weight_version = 3  # new groups come from version 3; the waiting ones are 3 behind
        groups, m = s.take(2, trainer_version=3)
        assert all(x.weight_version == 3 for g in groups for x in g.samples)
        assert m["async/dropped_stale_groups"] >= 2
    finally:
        s.stop()


def test_keep_trains_stale_groups_and_dynamic_sampling_drops_equal_rewards():
    mgr = ScriptedManager(reward_of=lambda row: [1.0, 1.0] if row % 2 else [0.0, 1.0])
    s = _stream(mgr, stale_groups="keep", dynamic_sampling=True)
    try:
        s.take(2, trainer_version=0)
        _wait(lambda: s.counts["dropped_equal_reward"] >= 1, "an equal-reward group dropped")
        groups, m = s.take(2, trainer_version=10)  # everything is 10 versions old: kept anyway
        assert len(groups) == 2 and m["async/dropped_stale_groups"] == 0
        assert all(g.row_index % 2 == 0 for g in groups) and m["async/dropped_equal_reward"] >= 1
    finally:
        s.stop()


def test_snapshot_runs_unfinished_rows_again_and_keeps_finished_groups():
    mgr = ScriptedManager(delay_s=0.05)
    s = _stream(mgr)
    s.take(2, trainer_version=0)
    _wait(lambda: s._running or s._ready, "groups running or waiting after the take")
    state = s.state_dict()
    s.stop()
    waiting = [g["row_index"] for g in json.loads(state["ready"])]
    assert state["requeue"] or waiting
    taken = PromptCursor(50, seed=3)
    # rows taken so far = the trained two + the waiting + the running ones, nothing else
    n_taken = 2 + len(waiting) + len(state["requeue"])
    assert sorted(mgr.started[:n_taken]) == sorted(taken.take(n_taken))
    # a fresh stream from the snapshot trains the waiting groups first, then runs the requeued rows
    mgr2 = ScriptedManager(delay_s=0.01)
    s2 = _stream(mgr2)
    s2.load_state_dict(json.loads(json.dumps(state)))
    try:
        first, _ = s2.take(len(waiting), trainer_version=0) if waiting else ([], {})
        assert [g.row_index for g in first] == waiting
        assert mgr2.started[:len(state["requeue"])] == state["requeue"]
    finally:
        s2.stop()


def test_gym_death_requeues_the_failed_row_and_restart_runs_it_again():
    dead = threading.Event()

    def check_gym():
        if dead.is_set():
            raise GymDiedForTest("gym server died")

    mgr = ScriptedManager(fail_rows=set(range(50)))
    dead.set()
    s = _stream(mgr, check_gym=check_gym)
    with pytest.raises(GymDiedForTest):
        s.take(2, trainer_version=0)
    failed_first = mgr.started[0]
    dead.clear()
    mgr2 = ScriptedManager()
    s.restart(mgr2)
    try:
        groups, m = s.take(2, trainer_version=0)
        assert failed_first in mgr2.started[:4]  # its prompt was not skipped
        assert len(groups) == 2
    finally:
        s.stop()


def test_staleness_counts_tokens_of_each_version():
    old = Sample([5, 6, 7, 8], [0, 1, 1, 1], [0.0] * 4, reward=1.0, weight_version=2,
                 token_versions=[-1, 2, 3, 3])
    new = Sample([5, 9], [0, 1], [0.0] * 2, reward=0.0, weight_version=3)
    m = staleness([old, new], trainer_version=3)
    assert m["batch/staleness_max"] == 1 and m["batch/old_token_share"] == pytest.approx(1 / 4)
    assert m["batch/staleness_mean"] == pytest.approx(1 / 4) and m["batch/weight_versions"] == 2
