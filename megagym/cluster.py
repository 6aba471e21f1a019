"""`megagym cluster query|serve|wait`: the Python side of the Slurm batch scripts in slurm/.

Owns: what the batch scripts must not do in shell: reading the run configuration (where a run
writes, how far its checkpoints got, whether it is finished), materialising the CPU demo's tiny
model once before any server starts, starting one policy server as a Slurm task (its GPU slice,
its port, its URL published as a file in a shared folder) and waiting, bounded, until a given
number of servers answer `/health` (printing their URLs as one JSON list for `servers.urls=`).
Every process is started from an argument list; no shell string is built from a config value.
Must not: place processes on nodes (the scripts' srun lines do) or contain training logic.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import time
import urllib.request
from pathlib import Path

from megagym.config import ConfigError, load


def _load(config: str, overrides: list[str]):
    from megagym.config.schema import RunConfig

    return load(RunConfig, config, overrides)


def checkpoint_root(cfg) -> Path:
    return Path(cfg.checkpoint.dir or Path(cfg.run.output_dir) / "checkpoints").absolute()


def latest_step(cfg) -> tuple[int, str]:
    """(step, path) of the newest complete checkpoint; (0, "") when there is none."""
    from megagym.trainer.checkpoint import latest_checkpoint, read_state

    latest = latest_checkpoint(checkpoint_root(cfg))
    return (int(read_state(latest)["step"]), str(latest)) if latest else (0, "")


def query(cfg, key: str) -> str:
    """One value for the scripts: output_dir, checkpoint_dir, steps, latest_step, latest, done, model_override."""
    if key == "output_dir":
        return str(Path(cfg.run.output_dir).absolute())
    if key == "checkpoint_dir":
        return str(checkpoint_root(cfg))
    if key == "steps":
        return str(cfg.train.steps)
    if key in ("latest_step", "latest", "done"):
        step, path = latest_step(cfg)
        return {"latest_step": str(step), "latest": path, "done": "1" if step >= cfg.train.steps else "0"}[key]
    if key == "model_override":
        from megagym.launch.local import materialize_model

        if not materialize_model(cfg):  # the CPU demo writes its tiny random model once
            return ""
        return f"model.hf_path={json.dumps(str(Path(cfg.model.hf_path).absolute()))}"
    raise ConfigError(f"cluster query: unknown key {key!r}")


# ------------------------------------------------------------------------------ servers

def _task_env() -> tuple[int, int]:
    """(global index, index on this node) of this server task under srun (0, 0 outside Slurm)."""
    return int(os.environ.get("SLURM_PROCID", 0)), int(os.environ.get("SLURM_LOCALID", 0))


def serve(cfg, url_dir: Path, port_base: int, advertise: str, bind: str = "127.0.0.1") -> int:
    """Publish this task's URL in `url_dir`, then become `megagym serve` (exec) with the run's settings.

    `bind` is the listening address: 127.0.0.1 when every client is on this node, the cluster-facing
    address (or 0.0.0.0) when the trainer and Gym run on other nodes."""
    from megagym.launch.servers import gpu_slice, server_overrides
    from megagym.server.process import free_port, serve_argv

    index, local = _task_env()
    env = dict(os.environ)
    per = int(env.get("MEGAGYM_GPUS_PER_SERVER", "0") or 0)
    if per and env.get("CUDA_VISIBLE_DEVICES"):
        env["CUDA_VISIBLE_DEVICES"] = gpu_slice(env["CUDA_VISIBLE_DEVICES"], local,
                                                per, int(env.get("MEGAGYM_GPU_OFFSET", "0") or 0))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    port = port_base + local if port_base else free_port(bind)
    host = advertise or ("127.0.0.1" if bind.startswith("127.") else socket.gethostname())
    url_dir.mkdir(parents=True, exist_ok=True)
    tmp = url_dir / f".server_{index}.url.tmp"
    tmp.write_text(f"http://{host}:{port}\n")
    os.replace(tmp, url_dir / f"server_{index}.url")
    argv, key_env = serve_argv(cfg.model.hf_path, bind, port, server_overrides(cfg, index))
    env.update(key_env)  # the API key travels in the environment, never on the command line
    print(f"megagym cluster serve: server {index} on {host}:{port} "
          f"(CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '')})", flush=True)
    os.execve(sys.executable, argv, env)
    return 0  # not reached


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=3) as r:
            return r.status == 200
    except OSError:
        return False


def wait_servers(url_dir: Path, count: int, timeout_s: float, watch_pid: int | None = None) -> list[str]:
    """URLs of `count` published servers once each answers /health; bounded, and fails fast when
    `watch_pid` (the srun that runs them) has ended."""
    deadline = time.monotonic() + timeout_s
    urls: list[str] = []
    while time.monotonic() < deadline:
        files = sorted(url_dir.glob("server_*.url"), key=lambda p: int(p.stem.split("_")[1]))
        urls = [f.read_text().strip() for f in files]
        if len(urls) >= count and all(_healthy(u) for u in urls[:count]):
            return urls[:count]
        if watch_pid and not _alive(watch_pid):
            raise RuntimeError(f"the policy server step (pid {watch_pid}) ended before {count} servers were "
                               f"ready ({len(urls)} published: {urls}); see the server_*.log files")
        time.sleep(2.0)
    raise TimeoutError(f"{count} policy servers not healthy after {timeout_s:.0f}s "
                       f"(published: {urls}); see the server_*.log files")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="megagym cluster", description="helpers of the Slurm scripts (slurm/)")
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("query", help="print values of a run, one a line: output_dir, checkpoint_dir, steps, "
                                     "latest_step, latest, done, model_override")
    q.add_argument("config")
    q.add_argument("overrides", nargs="*")
    q.add_argument("--get", required=True, action="append", help="repeatable: one value per line, in order")
    s = sub.add_parser("serve", help="publish this task's URL, then run `megagym serve` for the run")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*")
    s.add_argument("--url-dir", required=True, help="shared folder where server_<i>.url is written")
    s.add_argument("--port-base", type=int, default=0, help="port of local server 0 (0: a free port)")
    s.add_argument("--advertise", default="", help="host name others use to reach this node "
                                                   "(default: 127.0.0.1 with a loopback --bind, else hostname)")
    s.add_argument("--bind", default="127.0.0.1", help="listening address (0.0.0.0 when other nodes call it)")
    w = sub.add_parser("wait", help="wait until COUNT published servers are healthy; print their URLs (JSON)")
    w.add_argument("url_dir")
    w.add_argument("--count", type=int, required=True)
    w.add_argument("--timeout", type=float, default=900.0)
    w.add_argument("--watch-pid", type=int, default=0)
    a = p.parse_args(argv)
    try:
        if a.cmd == "wait":
            print(json.dumps(wait_servers(Path(a.url_dir), a.count, a.timeout, a.watch_pid or None)))
            return 0
        cfg = _load(a.config, a.overrides)
        if a.cmd == "query":
            with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the values
                values = [query(cfg, key) for key in a.get]
            print("\n".join(values))
            return 0
        return serve(cfg, Path(a.url_dir), a.port_base, a.advertise, a.bind)
    except (ConfigError, RuntimeError, TimeoutError) as e:
        print(f"megagym cluster {a.cmd}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
