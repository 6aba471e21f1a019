"""ServerProcess: a port it picked that something else takes before the server binds it (seen in
CI: the late uvicorn bind lost a race) costs a restart on a new port, not a failed session; a
stopped server leaves no vLLM IPC socket behind, even one killed with SIGKILL, and a standalone
`megagym serve` removes its own socket directory when signalled."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
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
            assert str(ipc) == sp.ipc_dir
            assert any(p.is_socket() for p in ipc.iterdir())
            os.killpg(sp.proc.pid, signal.SIGKILL)  # no handler of the server's runs
            sp.proc.wait(timeout=30)
            assert ipc.exists()
        finally:
            sp.stop()
        assert not ipc.exists()  # removed by the parent, sockets and all
        # a port the caller chose is not silently changed
        fixed = process.ServerProcess(str(tiny_qwen3), port=taken, overrides=["dtype=float32", "max_model_len=1024"],
                                      log_path=tmp_path / "fixed.log")
        with pytest.raises(process.PortTaken, match="address already in use"):
            fixed.start(timeout_s=300)


def test_standalone_serve_removes_its_socket_dir_on_sigterm(tmp_path):
    """`megagym serve` outside ServerProcess (a user's shell, `megagym cluster serve` under srun)
    makes its own directory; its signal handler removes it, then the process dies of the signal
    as it would have without the handler (uvicorn re-raises the signal it caught this way)."""
    ipc = tmp_path / "megagym-vllm-ipc-x"
    ipc.mkdir()
    (ipc / "socket-stand-in").write_text("")
    code = ("import signal, sys; from megagym.server.cli import remove_on_signal; "
            "remove_on_signal(sys.argv[1]); signal.raise_signal(signal.SIGTERM); sys.exit(3)")
    proc = subprocess.run([sys.executable, "-c", code, str(ipc)], timeout=60)
    assert proc.returncode == -signal.SIGTERM
    assert not ipc.exists()
