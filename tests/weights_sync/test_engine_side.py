"""The engine-side update sequence and the router, against a recording fake engine (no vLLM)."""

from __future__ import annotations

import asyncio
import time

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from megagym.weights.sync.engine_side import (
    WeightSyncError,
    WeightSyncState,
    apply_update,
    engine_kwargs,
)
from megagym.weights.sync.routes import router


class FakeEngine:
    def __init__(self, fail_on_bucket: int | None = None):
        self.calls: list[str] = []
        self.fail_on_bucket = fail_on_bucket
        self.n = 0

        class _P:
            world_size_across_dp = 1

        class _C:
            parallel_config = _P()

        self.vllm_config = _C()

    async def init_weight_transfer_engine(self, req):
        self.calls.append(f"init:{sorted(req.init_info)}")

    async def pause_generation(self, mode, clear_cache):
        self.calls.append(f"pause:{mode}")

    async def start_weight_update(self):
        self.calls.append("start")

    async def update_weights(self, request):
        if self.n == self.fail_on_bucket:
            raise RuntimeError("weight 'x' has shape [1], the served model expects [2]")
        self.n += 1
        self.calls.append("update")

    async def finish_weight_update(self, weight_version=None):
        self.calls.append(f"finish:{weight_version}")

    async def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")

    async def collective_rpc(self, method, *a, **k):
        self.calls.append(method)

    async def resume_generation(self):
        self.calls.append("resume")


def test_engine_kwargs():
    kw = engine_kwargs("shm")
    assert kw["weight_transfer_config"] == {"backend": "megagym_shm"}
    assert kw["worker_extension_cls"].endswith("shm_backend.MegagymWorkerExtension")
    assert engine_kwargs("nccl")["weight_transfer_config"] == {"backend": "nccl"}
    with pytest.raises(ValueError, match="unknown weight-sync backend"):
        engine_kwargs("disk")


def test_apply_update_runs_the_sequence_in_order():
    engine, state = FakeEngine(), WeightSyncState()

    async def go():
        await state.init(engine, {"validate": True})
        return await apply_update(engine, [{}, {}, {}], state=state)

    assert asyncio.run(go()) == 1
    assert engine.calls == [
        "init:['validate']", "pause:wait", "start", "update", "update", "update", "finish:1",
        "reset_prefix_cache", "megagym_refresh_lm_head", "resume",
    ]
    assert not state.active and state.consistent


def test_failed_bucket_rolls_back_and_resumes():
    engine, state = FakeEngine(fail_on_bucket=1), WeightSyncState(weight_version=4)

    async def go():
        await state.init(engine, {})
        await apply_update(engine, [{}, {}, {}], state=state)

    with pytest.raises(WeightSyncError, match="bucket 1 was rejected.*version stays 4.*expects"):
        asyncio.run(go())
    assert engine.calls[-3:] == ["megagym_abort_weight_update", "reset_prefix_cache", "resume"]
    assert "finish:5" not in engine.calls and state.weight_version == 4
    assert not state.active and not state.consistent


def test_keep_mode_freezes_in_flight_requests_for_the_update():
    engine, state = FakeEngine(), WeightSyncState()

    async def go():
        await state.init(engine, {})
        return await apply_update(engine, [{}], state=state, pause_mode="keep", weight_version=2)

    assert asyncio.run(go()) == 2
    # the version is set (finish) before generation resumes: tokens after it carry version 2
    assert engine.calls[1:] == ["pause:keep", "start", "update", "finish:2", "reset_prefix_cache",
                                "megagym_refresh_lm_head", "resume"]
    with pytest.raises(WeightSyncError, match="pause_mode"):
        asyncio.run(state.start(engine, pause_mode="freeze"))


def test_router_answers_503_engine_dead_when_the_engine_died():
    class DeadOnUpdate(FakeEngine):
        errored = False

        async def update_weights(self, request):
            self.errored = True
            raise RuntimeError("EngineCore died")

    app = FastAPI()
    app.include_router(router)
    app.state.engine = DeadOnUpdate()
    with TestClient(app) as client:
        client.post("/weights/init", json={})
        assert client.post("/weights/start", json={"pause_mode": "keep"}).status_code == 200
        r = client.post("/weights/update", json={"update_info": {}})
        assert r.status_code == 503 and r.json()["error"].startswith("engine dead: ")
        assert client.post("/weights/start", json={"pause_mode": "freeze"}).status_code == 400


def test_router_contract_and_errors():
    app = FastAPI()
    app.include_router(router)
    app.state.engine = FakeEngine(fail_on_bucket=0)
    app.state.weight_version = 3
    with TestClient(app) as client:
        assert client.post("/weights/start", json={}).status_code == 400  # not initialised
        assert client.post("/weights/init", json={"init_info": {}}).json() == {"weight_version": 3}
        assert client.post("/weights/start", json={"pause_mode": "wait"}).status_code == 200
        assert client.post("/weights/start", json={}).status_code == 409  # already active
        r = client.post("/weights/update", json={"update_info": {"names": []}})
        assert r.status_code == 400 and "expects [2]" in r.json()["error"]
        assert client.get("/weights/info").json()["active"] is False
        app.state.engine.fail_on_bucket = None
        client.post("/weights/start", json={})
        client.post("/weights/update", json={"update_info": [{}, {}]})
        assert client.post("/weights/finish", json={"weight_version": 10}).json()["weight_version"] == 10
        assert app.state.weight_version == 10
        info = client.get("/weights/info").json()
        assert info == {"weight_version": 10, "active": False, "consistent": True, "world_size": 1}
        assert client.post("/weights/abort").json() == {"weight_version": 10}


def test_watchdog_abandons_an_update_whose_trainer_went_quiet():
    engine, state = FakeEngine(), WeightSyncState(idle_timeout_s=0.2)

    async def go():
        await state.init(engine, {})
        await state.start(engine)
        deadline = time.monotonic() + 60
        while state.active and time.monotonic() < deadline:  # the watchdog's doing, however slow the machine
            await asyncio.sleep(0.05)

    asyncio.run(go())
    assert not state.active and engine.calls[-1] == "resume"
    assert "megagym_abort_weight_update" in engine.calls


def test_engine_death_during_a_call_fails_fast_instead_of_hanging():
    class DyingEngine(FakeEngine):
        errored = False
        dead_error = RuntimeError("worker killed")

        async def update_weights(self, request):
            self.errored = True
            await asyncio.sleep(3600)  # vLLM leaves the RPC pending when the worker is killed

    engine, state = DyingEngine(), WeightSyncState()

    async def go():
        await state.init(engine, {})
        await state.start(engine)
        await asyncio.wait_for(state.update(engine, {}), 10)

    with pytest.raises(WeightSyncError, match="engine died"):
        asyncio.run(go())
    assert not state.active
