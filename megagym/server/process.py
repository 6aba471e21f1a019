"""Start and stop a `megagym serve` subprocess (tests, benchmarks, launchers on one machine).

Owns: the one `free_port`, the `megagym serve` command line (`serve_argv`, also exec'd by
`megagym cluster serve`), launching the server in its own process group on 127.0.0.1, waiting (bounded) for
`/health`, and stopping it: SIGTERM to the server's main PID first (so the engine shuts down in
order and in-flight requests finish or fail cleanly), then SIGKILL to the whole group for
anything left. The caller gets the base URL (no `/v1`) and the log path. An `api_key=...`
override never reaches the command line (`ps` shows it to every user): `serve_argv` leaves it out
and returns it for the child's environment (`MEGAGYM_API_KEY`, readable only by its owner), which
`megagym serve` reads. Each server's vLLM engine gets a directory of its own for its ZMQ IPC
sockets (VLLM_RPC_BASE_PATH, unless the caller's environment sets one), which `stop` removes after
the process group is gone: a server killed with SIGKILL, or a test-only app that never cleans up,
leaves nothing in the temp dir.
Must not: pick models or settings beyond what it is given (the KV-cache size travels in the
overrides, as `ServerConfig.kv_cache_gib`); import vLLM. Several servers for a run: launch/servers.py.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from megagym.server.cli import API_KEY_ENV, IPC_DIR_ENV, make_ipc_dir


QUIET_PORTS_LOW = 20001  # above Gym's own server range (env.port_range_low..high: 10001-20000)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now at `host` (the caller must still handle losing a race).

    Drawn at random below the kernel's ephemeral range (`ip_local_port_range`), not with bind(0):
    bind(0) hands out an ephemeral port, the same pool every outgoing connection draws its source
    port from, so a server that binds late (Gym's head server binds after Ray has started and
    opened its connections) can find its port taken (seen in CI). Falls back to bind(0) where
    that range leaves no room.
    """
    low, high = QUIET_PORTS_LOW, _ephemeral_low() - 1
    draw = random.SystemRandom()
    for _ in range(64 if high - low >= 1000 else 0):
        port = draw.randint(low, high)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default; macOS's range starts at 49152


def serve_argv(model_path: str, host: str, port: int, overrides: list[str]) -> tuple[list[str], dict]:
    """The `megagym serve` command line for one server, and the environment it needs beside it
    (the API key, which must not appear on a command line)."""
    rest, api_key = split_api_key(overrides)
    argv = [sys.executable, "-m", "megagym.cli", "serve", "--model", str(model_path),
            "--host", host, "--port", str(port), *rest]
    return argv, ({API_KEY_ENV: api_key} if api_key else {})


def split_api_key(overrides: list[str]) -> tuple[list[str], str | None]:
    """(`overrides` without any `api_key=...`, the key as `megagym serve` would have parsed it)."""
    from megagym.config.loader import parse_override

    rest, key = [], None
    for text in overrides:
        path, value = parse_override(text)
        if path == ["api_key"]:
            key = None if value in (None, "") else str(value)
        else:
            rest.append(text)
    return rest, key


class PortTaken(RuntimeError):
    """The server could not bind its port: something else took it first."""


@dataclass
class ServerProcess:
    model_path: str
    overrides: list[str] = field(default_factory=list)
    port: int = 0
    log_path: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    command: list[str] | None = None  # default: `python -m megagym.cli serve ...`
    proc: subprocess.Popen | None = None
    ipc_dir: str | None = None  # the engine's IPC socket directory, when this object made it

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 240.0, attempts: int = 3) -> "ServerProcess":
        """Start and wait for /health. A port this class picked can be taken by another process
        (the engine's own workers included) before uvicorn binds it, late in start-up: then it
        starts again on a new free port, up to `attempts` times."""
        chosen = not self.port
        for attempt in range(1, attempts + 1):
            try:
                return self._start_once(timeout_s)
            except PortTaken:
                if not chosen or attempt == attempts:
                    raise
                self.port = 0

    def _start_once(self, timeout_s: float) -> "ServerProcess":
        self.port = self.port or free_port()
        cmd, key_env = (self.command, {}) if self.command else self.argv()
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               **self.env}
        env.pop(API_KEY_ENV, None)
        env.update(key_env)
        if IPC_DIR_ENV not in env:  # `megagym serve` then makes no directory of its own
            self.ipc_dir = env[IPC_DIR_ENV] = make_ipc_dir()
        self.log_path = Path(self.log_path or f"/tmp/megagym-serve-{self.port}.log")
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code, pgid, self.proc = self.proc.returncode, self.proc.pid, None
                try:
                    os.killpg(pgid, signal.SIGKILL)  # engine processes the server left behind
                except ProcessLookupError:
                    pass
                self._remove_ipc_dir()
                tail = self.tail()
                kind = PortTaken if "address already in use" in tail else RuntimeError
                raise kind(f"server exited with {code} during start-up; log:\n{tail}")
            try:
                with urllib.request.urlopen(self.health_url(), timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"server not healthy after {timeout_s:.0f}s; log:\n{self.tail()}")

    def argv(self) -> tuple[list[str], dict]:
        """The server's command line once its port is known, and the environment it needs beside
        it (subclasses start other apps)."""
        return serve_argv(self.model_path, "127.0.0.1", self.port, self.overrides)

    def health_url(self) -> str:
        return f"{self.base_url}/health"

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def _remove_ipc_dir(self) -> None:
        if self.ipc_dir:
            shutil.rmtree(self.ipc_dir, ignore_errors=True)
            self.ipc_dir = None

    def stop(self, timeout_s: float = 40.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            self._remove_ipc_dir()
            return
        pgid = proc.pid  # start_new_session: the group id is the leader's pid
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(pgid, signal.SIGKILL)  # the engine core and workers, if anything is left
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self._remove_ipc_dir()

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
