"""ServerProcess: a port it picked that something else takes before the server binds it (seen in
CI: the late uvicorn bind lost a race) costs a restart on a new port, not a failed session; a
stopped server leaves no vLLM IPC socket behind."""

from __future__ import annotations

import socket
import tempfile
from pathlib import Path

import pytest

from megagym.server import process

pytestmark = [pytest.mark.vllm]


def test_taken_port_is_retried_on_a_new_one(tiny_qwen3, tmp_path, monkeypatch):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        handed = iter([taken])  # the first free port handed out is already in use
        real = process.free_port
        monkeypatch.setattr(process, "free_port", lambda: next(handed, None) or real())
        sp = process.ServerProcess(str(tiny_qwen3), overrides=["dtype=float32", "max_model_len=1024"],
                                   log_path=tmp_path / "serve.log")
        before = set(Path(tempfile.gettempdir()).glob("megagym-vllm-ipc-*"))  # the session's server has one
        sp.start(timeout_s=300)
        try:
            assert sp.port != taken
            # the engine's ZMQ sockets lie in a directory of this server's own
            (ipc,) = set(Path(tempfile.gettempdir()).glob("megagym-vllm-ipc-*")) - before
            assert any(p.is_socket() for p in ipc.iterdir())
        finally:
            sp.stop()
        assert not ipc.exists()  # removed on exit, sockets and all
        # a port the caller chose is not silently changed
        fixed = process.ServerProcess(str(tiny_qwen3), port=taken, overrides=["dtype=float32", "max_model_len=1024"],
                                      log_path=tmp_path / "fixed.log")
        with pytest.raises(process.PortTaken, match="address already in use"):
            fixed.start(timeout_s=300)
