"""`megagym serve --model PATH [--host H] [--port P] [--config FILE] [--api-key-file F] [key=value ...]`.

Owns: turning the command line (and an optional YAML file) into a `ServerConfig` and running the
app under uvicorn with the connection limits of connections.py and bounded graceful shutdown.
The API key never needs the command line (where `ps` shows it to every user of the node): it
comes from the `MEGAGYM_API_KEY` environment variable (removed from this process's environment
once read, so the engine's processes do not inherit it) or from `--api-key-file`, a file only its
owner may read. An `api_key=` override still works but warns. SIGINT/SIGTERM to this process stop
the server and then the engine (bounded by `shutdown_timeout_s`). vLLM's engine processes talk over
ZMQ Unix sockets named by UUID in VLLM_RPC_BASE_PATH (default: the temp dir, where nobody removes
them); unless the caller set it, each server points it at a directory of its own (`make_ipc_dir`),
removed on exit and on SIGTERM/SIGINT. A server started by `ServerProcess` gets its directory from
the parent, which removes it even after a SIGKILL.
Must not: contain server behaviour; everything else is in app.py / engine.py.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import stat
import sys
import tempfile

from megagym.config import ConfigError, load

API_KEY_ENV = "MEGAGYM_API_KEY"
IPC_DIR_ENV = "VLLM_RPC_BASE_PATH"  # where vLLM's engine processes put their ZMQ IPC sockets


def parse(argv: list[str]):
    from megagym.server.config import ServerConfig

    p = argparse.ArgumentParser(prog="megagym serve", description="OpenAI-compatible policy server on vLLM")
    p.add_argument("--model", help="HF model folder (or set model=... / a config file)")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument("--config", help="YAML file with ServerConfig keys")
    p.add_argument("--api-key-file", help=f"file holding the bearer API key, readable by its owner only "
                                          f"(or set {API_KEY_ENV})")
    p.add_argument("--log-level", default="info")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. max_model_len=2048 train_sampling.temperature=0.7")
    a = p.parse_intermixed_args(argv)
    overrides = list(a.overrides)
    for key in ("model", "host", "port"):
        value = getattr(a, key)
        if value is not None:
            overrides.append(f"{key}={value}")
    if any(o.split("=", 1)[0].strip().lstrip("+") == "api_key" for o in overrides):
        print(f"megagym serve: warning: api_key on the command line is visible to every user of this node "
              f"(ps); pass it in {API_KEY_ENV} or --api-key-file", file=sys.stderr)
    cfg = load(ServerConfig, a.config, overrides)
    key = api_key_from(a.api_key_file, os.environ)
    if key is not None:
        if cfg.api_key not in (None, key):
            raise ConfigError(f"api_key: given both in the config and in {API_KEY_ENV} / --api-key-file")
        cfg.api_key = key
    return cfg, a.log_level


def api_key_from(path: str | None, environ) -> str | None:
    """The key from --api-key-file (owner-only permissions required) or the environment, or None."""
    key = environ.pop(API_KEY_ENV, None)
    if path:
        if key is not None:
            raise ConfigError(f"api_key: give either --api-key-file or {API_KEY_ENV}, not both")
        try:
            info = os.stat(path)
            if info.st_uid != os.getuid() or info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise ConfigError(f"--api-key-file {path}: must belong to this user and be unreadable by "
                                  f"others (chmod 600), mode is {stat.filemode(info.st_mode)}")
            with open(path, encoding="utf-8") as f:
                key = f.read().strip()
        except OSError as e:
            raise ConfigError(f"--api-key-file {path}: {e.strerror}") from None
    if key is not None and not key:
        raise ConfigError("api_key: the key is empty")
    return key


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg, log_level = parse(argv)
    except ConfigError as e:
        print(f"megagym serve: {e}", file=sys.stderr)
        return 2
    import uvicorn

    from megagym.server.app import create_app
    from megagym.server.connections import uvicorn_settings

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:  # the port is ours before the engine loads: a taken one fails now, not after the load
        sock = bind_socket(cfg.host, cfg.port)
    except OSError as e:
        print(f"megagym serve: cannot bind {cfg.host}:{cfg.port}: {e.strerror.lower() if e.strerror else e}",
              file=sys.stderr)
        return 1
    ipc_dir = None
    if IPC_DIR_ENV not in os.environ:  # read when the engine starts, inherited by its processes
        ipc_dir = os.environ[IPC_DIR_ENV] = make_ipc_dir()
        remove_on_signal(ipc_dir)
    try:
        config = uvicorn.Config(create_app(cfg), log_level=log_level, timeout_graceful_shutdown=10,
                                **uvicorn_settings(cfg))
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        if ipc_dir:
            shutil.rmtree(ipc_dir, ignore_errors=True)
    return 0


def make_ipc_dir() -> str:
    """A new private directory for one server's vLLM IPC sockets (the caller removes it)."""
    return tempfile.mkdtemp(prefix="megagym-vllm-ipc-")


def remove_on_signal(path: str) -> None:
    """On SIGTERM/SIGINT remove `path`, then die of the signal as before. uvicorn swaps these
    handlers out while it serves and, after its graceful shutdown, raises the signal it caught
    again under the handler it found: this one (a `finally` would never run)."""
    def handler(signum, frame):
        shutil.rmtree(path, ignore_errors=True)
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, handler)


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) for uvicorn to listen on (IPv6 when `host` is one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


if __name__ == "__main__":
    sys.exit(main())
