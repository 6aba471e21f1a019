"""A sync survives a policy server that is gone: the real shm sender against weight-sync routers on
fake engines (no vLLM), served by uvicorn in threads, and ports where nothing listens."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from megagym.server.process import free_port
from megagym.weights.sync.sender import WeightSyncFailed, make_sender

from .test_engine_side import FakeEngine

TENSORS = [("model.a", torch.ones(64)), ("model.b", torch.zeros(8, 8))]


class Live:
    """The weight-sync router on a fake engine, served on 127.0.0.1 until `stop()`."""

    def __init__(self, engine: FakeEngine | None = None):
        import uvicorn
        from fastapi import FastAPI

        from megagym.weights.sync.routes import router

        app = FastAPI()
        app.include_router(router)
        app.state.engine = self.engine = engine or FakeEngine()
        app.state.weight_version = 0
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture()
def live():
    servers: list[Live] = []

    def make(engine=None) -> Live:
        servers.append(Live(engine))
        return servers[-1]

    yield make
    for s in servers:
        s.stop()


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


def test_a_dead_server_is_dropped_and_the_sync_goes_on(live, capfd, no_leaked_segments):
    a, dead = live(), dead_url()
    with make_sender("shm", [dead, a.url], pause_mode="keep", timeout_s=10) as sender:
        stats = sender.send(iter(TENSORS), weight_version=3)
        assert stats.weight_version == 3 and stats.lost_servers == [dead] and stats.tensors == 2
        assert sender.urls == [a.url] and sender.lost == [dead]
        assert "pause:keep" in a.engine.calls and "finish:3" in a.engine.calls
        err = capfd.readouterr().err
        assert err.count(f"lost policy server {dead}") == 1  # one line, naming it
        stats = sender.send(iter(TENSORS))
        assert stats.weight_version == 4 and stats.lost_servers == [] and sender.lost == [dead]


def test_a_server_that_dies_mid_sync_is_dropped(live, no_leaked_segments):
    a, b = live(), live()
    with make_sender("shm", [a.url, b.url], timeout_s=10) as sender:
        sender.begin()
        b.stop()  # gone between the pause and the first bucket
        sender.push(iter(TENSORS))
        stats = sender.commit(7)
        assert stats.lost_servers == [b.url] and sender.urls == [a.url]
        assert a.engine.calls[-4:] == ["finish:7", "reset_prefix_cache", "megagym_refresh_lm_head", "resume"]


def test_engine_dead_is_lost_but_a_refused_update_is_an_error(live, no_leaked_segments):
    class DeadOnUpdate(FakeEngine):
        errored = False

        async def update_weights(self, request):
            self.errored = True
            raise RuntimeError("EngineCore died")

    ok, dying = live(), live(DeadOnUpdate())
    with make_sender("shm", [ok.url, dying.url], timeout_s=10) as sender:
        stats = sender.send(iter(TENSORS))
        assert stats.lost_servers == [dying.url] and sender.urls == [ok.url]

    refusing = live(FakeEngine(fail_on_bucket=0))  # 400: a real error, the server stays in the group
    ok2 = live()
    with make_sender("shm", [ok2.url, refusing.url], timeout_s=10) as sender:
        with pytest.raises(WeightSyncFailed, match="HTTP 400.*expects"):
            sender.send(iter(TENSORS))
        assert sender.urls == [ok2.url, refusing.url] and sender.lost == []
        assert ok2.engine.calls[-1] == "resume"  # the update was abandoned everywhere


def test_no_server_left_raises(no_leaked_segments):
    urls = [dead_url(), dead_url()]
    with make_sender("shm", urls, timeout_s=5) as sender:
        with pytest.raises(WeightSyncFailed, match="no policy server left"):
            sender.init()
        assert sender.urls == [] and sender.lost == urls
        with pytest.raises(WeightSyncFailed, match="no policy server left"):
            sender.send(iter(TENSORS))


def test_pause_modes():
    for mode in ("wait", "abort", "keep"):
        make_sender("shm", ["http://127.0.0.1:1"], pause_mode=mode).close()
    with pytest.raises(ValueError, match="pause_mode"):
        make_sender("shm", ["http://127.0.0.1:1"], pause_mode="freeze")
