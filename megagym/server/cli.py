"""`megagym serve --model PATH [--host H] [--port P] [--config FILE] [key=value ...]`.

Owns: turning the command line (and an optional YAML file) into a `ServerConfig` and running the
app under uvicorn with bounded graceful shutdown. SIGINT/SIGTERM to this process stop the server
and then the engine (bounded by `shutdown_timeout_s`).
Must not: contain server behaviour; everything else is in app.py / engine.py.
"""

from __future__ import annotations

import argparse
import logging
import sys

from megagym.config import ConfigError, load


def parse(argv: list[str]):
    from megagym.server.config import ServerConfig

    p = argparse.ArgumentParser(prog="megagym serve", description="OpenAI-compatible policy server on vLLM")
    p.add_argument("--model", help="HF model folder (or set model=... / a config file)")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument("--config", help="YAML file with ServerConfig keys")
    p.add_argument("--log-level", default="info")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. max_model_len=2048 train_sampling.temperature=0.7")
    a = p.parse_intermixed_args(argv)
    overrides = list(a.overrides)
    for key in ("model", "host", "port"):
        value = getattr(a, key)
        if value is not None:
            overrides.append(f"{key}={value}")
    return load(ServerConfig, a.config, overrides), a.log_level


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg, log_level = parse(argv)
    except ConfigError as e:
        print(f"megagym serve: {e}", file=sys.stderr)
        return 2
    import uvicorn

    from megagym.server.app import create_app

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(
        create_app(cfg),
        host=cfg.host,
        port=cfg.port,
        log_level=log_level,
        timeout_graceful_shutdown=10,
        timeout_keep_alive=30,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
