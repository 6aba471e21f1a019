"""Lifecycle of one Gym stack: start `gym env start`, wait for it, discover it, watch it, stop it.

Owns: `GymStack` — launching Gym (from a `LaunchPlan`) as a child process in its own process
group with a run marker in its environment, waiting (bounded) for the head server and every server
instance and naming what did not come up, discovering instances and agents from the head server
(`/server_instances`, `/global_config_dict_yaml`), telling which Gym servers died, and stopping
everything the stack started — Gym's servers and Ray's processes, which leave the process group —
on `stop()`, on interpreter exit, on SIGTERM, or when start-up fails (through `kill.py`); then
checking nothing is left; `stop_from_state` does the same for a stack another process started.
Must not: import nemo_gym, or signal any process that does not carry this stack's run marker
(or belong to the process group it created).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import httpx
import yaml

from megagym.gym.compose import LaunchPlan, compose, stack_tmpdir
from megagym.gym.config import GymConfig, resolve_environments
from megagym.gym.errors import GymError
from megagym.gym.kill import children, has_live_child_or_self, kill_run, marker_pids, pid_alive
from megagym.gym.model_name import model_name_of

STATE_FILE = "gym_stack.json"


@dataclass
class ServerInstance:
    name: str  # the instance (config) name, e.g. workplace_assistant_simple_agent
    server_type: str  # resources_servers | responses_api_agents | responses_api_models | environment_servers
    server: str  # the server folder, e.g. simple_agent
    url: str
    pid: int | None


# ---------------------------------------------------------------------------------- the stack

class HeadPortTaken(GymError):
    """Gym's head server could not bind its port: something else took it first."""


class GymStack:
    """One running Gym (`gym env start` + its servers + Ray), started and owned by this process.

    Use `GymStack.start(cfg, policy_base_urls=[...], policy_model_name=...)` or as a context
    manager; `stop()` is idempotent and also runs at interpreter exit and on SIGTERM.
    """

    def __init__(self, plan: LaunchPlan, start_timeout_s: float = 180.0, stop_timeout_s: float = 20.0):
        self.plan = plan
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.proc: subprocess.Popen | None = None
        self.instances: dict[str, ServerInstance] = {}
        self.global_config: dict = {}
        self.startup_s: float | None = None
        self._log = None
        self._stopped = False
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ start
    @classmethod
    def start(cls, cfg: GymConfig, policy_base_urls: list[str] | None = None,
              policy_model_name: str | None = None, run_dir: str | Path | None = None) -> "GymStack":
        """Compose, launch and wait for a Gym stack; on any failure everything started is stopped."""
        resolve_environments(cfg)  # an unknown environment fails before anything else
        urls = list(policy_base_urls if policy_base_urls is not None else cfg.policy_base_urls)
        name = policy_model_name or cfg.policy_model_name or (model_name_of(urls[0], api_key=cfg.policy_api_key) if urls else "")
        attempts = 1 if cfg.head_port else 2  # a port megagym picked may be retried; the user's may not
        for attempt in range(1, attempts + 1):
            stack = cls(compose(cfg, urls, name, run_dir), cfg.start_timeout_s, cfg.stop_timeout_s)
            stack.launch()
            try:
                stack.wait_ready()
                return stack
            except HeadPortTaken:
                stack.stop()
                if attempt == attempts:
                    raise
            except BaseException:
                stack.stop()
                raise

    def launch(self) -> None:
        plan = self.plan
        plan.run_dir.mkdir(parents=True, exist_ok=True)
        stack_tmpdir(plan.run_id).mkdir(mode=0o700, exist_ok=True)  # Python ignores a TMPDIR that is not there
        env = dict(os.environ)
        env.pop("RAY_ADDRESS", None)  # never join someone else's Ray cluster
        env.update(plan.env)
        self._log = open(plan.log_file, "ab")
        self._log_start = self._log.tell()  # the log may hold earlier launches' lines (a restart appends)
        self._t0 = time.monotonic()
        self.proc = subprocess.Popen(
            plan.argv, cwd=plan.cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        self.pgid = self.proc.pid  # start_new_session: the child leads its own group
        self._write_state()
        atexit.register(self.stop)
        _install_sigterm_handler()

    def _write_state(self) -> None:
        state = {"run_id": self.plan.run_id, "pid": self.proc.pid, "pgid": self.pgid,
                 "head_url": self.plan.head_url, "log": str(self.plan.log_file),
                 "started_at": time.time()}
        (self.plan.run_dir / STATE_FILE).write_text(json.dumps(state, indent=1))

    def log_tail(self, n: int = 30) -> str:
        try:
            lines = self.plan.log_file.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        return "\n".join(lines[-n:])

    def wait_ready(self) -> None:
        """Block until Gym's head server reports ready, bounded by `start_timeout_s`."""
        deadline = time.monotonic() + self.start_timeout_s
        head = self.plan.head_url
        head_seen = False
        with httpx.Client(timeout=2.0) as client:
            while True:
                if self.proc.poll() is not None:
                    raise GymError(
                        f"`gym env start` exited with code {self.proc.returncode} before it was ready "
                        f"(log {self.plan.log_file}):\n{self.log_tail()}")
                if not head_seen and self._head_bind_failed():
                    raise HeadPortTaken(
                        f"the Gym head server could not bind {urlparse(head).netloc}: address already in use "
                        f"(env.head_port; 0 picks a free one) (log {self.plan.log_file}):\n{self.log_tail()}")
                try:
                    r = client.get(f"{head}/readyz")
                    head_seen = True
                    if r.status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise GymError(self._not_ready_message(client, head_seen))
                time.sleep(0.5)
            self.startup_s = time.monotonic() - self._t0
            self.discover(client)

    def _head_bind_failed(self) -> bool:
        """Gym runs its head server in a thread of `gym env start`; when uvicorn cannot bind the
        port the thread ends, logs it, and Gym waits for the head forever: read it from the log."""
        port = urlparse(self.plan.head_url).port
        try:
            with open(self.plan.log_file, "rb") as f:
                f.seek(self._log_start)
                text = f.read().decode(errors="replace")
        except FileNotFoundError:
            return False
        return any("address already in use" in line and f", {port})" in line for line in text.splitlines())

    def _not_ready_message(self, client: httpx.Client, head_seen: bool) -> str:
        t = f"{self.start_timeout_s:g}s (env.start_timeout_s)"
        if not head_seen:
            what = f"the Gym head server at {self.plan.head_url} did not answer within {t}"
        else:
            down = []
            try:
                for inst in self._fetch_instances(client).values():
                    if not _answers(inst.url):
                        down.append(f"{inst.name} ({inst.server_type}/{inst.server}, {inst.url})")
            except httpx.HTTPError as e:
                down.append(f"<could not list server instances: {e}>")
            if down:
                what = f"these Gym servers did not come up within {t}: " + ", ".join(down)
            else:
                urls = self.plan.overrides.get("policy_base_url")
                what = (f"every Gym server answers but Gym did not mark itself ready within {t}; it "
                        f"is probably still waiting for the policy endpoints {urls} to answer GET /models")
        return f"{what}\n(log {self.plan.log_file}):\n{self.log_tail()}"

    def _fetch_instances(self, client: httpx.Client) -> dict[str, ServerInstance]:
        r = client.get(f"{self.plan.head_url}/server_instances")
        r.raise_for_status()
        out = {}
        for d in r.json():
            name = d.get("config_path") or d.get("process_name")
            out[name] = ServerInstance(name=name, server_type=d.get("server_type", ""),
                                       server=d.get("name", ""), url=d.get("url", ""), pid=d.get("pid"))
        return out

    def discover(self, client: httpx.Client | None = None) -> None:
        """Read server instances and the resolved global config from the head server."""
        own = client is None
        client = client or httpx.Client(timeout=5.0)
        try:
            self.instances = self._fetch_instances(client)
            r = client.get(f"{self.plan.head_url}/global_config_dict_yaml")
            r.raise_for_status()
            text = r.json() if r.headers.get("content-type", "").startswith("application/json") else r.text
            self.global_config = yaml.safe_load(text) or {}
        finally:
            if own:
                client.close()
        agents = self.agents
        for env_name, spec in self.plan.environments.items():
            if spec.agent not in agents:
                raise GymError(
                    f"environment '{env_name}': Gym started no agent named '{spec.agent}' "
                    f"(agents: {', '.join(sorted(agents)) or 'none'}); check its `agent:` and gym_configs")

    # ---------------------------------------------------------------- discovery
    @property
    def head_url(self) -> str:
        return self.plan.head_url

    @property
    def run_id(self) -> str:
        return self.plan.run_id

    @property
    def environments(self):
        return self.plan.environments

    @property
    def agents(self) -> dict[str, str]:
        """Agent instance name -> base URL (POST {url}/run runs one rollout)."""
        return {n: i.url for n, i in self.instances.items() if i.server_type == "responses_api_agents"}

    @property
    def agent_to_env(self) -> dict[str, str]:
        return self.plan.agent_to_env

    def agent_dependencies(self, agent: str) -> list[str]:
        """The instances a rollout through `agent` needs: the agent, its resources and model servers."""
        deps = [agent]
        block = self.global_config.get(agent, {}).get("responses_api_agents", {})
        for server_cfg in block.values() if isinstance(block, dict) else []:
            for key in ("resources_server", "model_server"):
                ref = server_cfg.get(key) if isinstance(server_cfg, dict) else None
                if isinstance(ref, dict) and ref.get("name") and ref["name"] not in deps:
                    deps.append(ref["name"])
        return deps

    def dead_servers(self) -> dict[str, str]:
        """Instance name -> why it is considered dead (process gone or port closed)."""
        dead = {}
        if self.proc is not None and self.proc.poll() is not None:
            dead["gym"] = f"`gym env start` (pid {self.proc.pid}) exited with {self.proc.returncode}"
        for inst in self.instances.values():
            if inst.pid is not None and not pid_alive(inst.pid):
                dead[inst.name] = f"process {inst.pid} exited"
            elif not _port_open(inst.url):
                dead[inst.name] = f"nothing listens at {inst.url}"
            elif inst.pid is not None and not has_live_child_or_self(inst.pid):
                dead[inst.name] = f"process {inst.pid} has no live server"
        return dead

    def server_pid(self, name: str) -> int | None:
        """PID of the Python process serving instance `name` (Gym starts it under a bash wrapper)."""
        inst = self.instances[name]
        kids = children(inst.pid) if inst.pid else []
        return kids[0] if kids else inst.pid

    def pids(self) -> list[int]:
        return marker_pids(self.plan.run_id)

    # ------------------------------------------------------------------- stop
    def stop(self) -> list[str]:
        """Stop Gym, its servers and Ray; return descriptions of anything still alive (ideally [])."""
        with self._lock:
            if self._stopped:
                return []
            self._stopped = True
        try:
            atexit.unregister(self.stop)
        except Exception:
            pass
        if self.proc is None:
            return []

        def wait_main(t: float) -> None:
            try:
                self.proc.wait(timeout=t)
            except subprocess.TimeoutExpired:
                pass

        left = kill_run(self.plan.run_id, self.pgid, self.proc.pid, self.stop_timeout_s, wait_main)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            left.append(f"pid {self.proc.pid}: gym env start (not reaped)")
        if self._log is not None:
            self._log.close()
        try:
            (self.plan.run_dir / STATE_FILE).unlink()
        except FileNotFoundError:
            pass
        if not left:
            shutil.rmtree(stack_tmpdir(self.plan.run_id), ignore_errors=True)
        return left

    def __enter__(self) -> "GymStack":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def stop_from_state(run_dir: str | Path, timeout: float = 20.0) -> list[str]:
    """Stop a stack started by another process (`megagym gym start --detach`) from its state file."""
    path = Path(run_dir) / STATE_FILE
    if not path.exists():
        raise GymError(f"no running Gym stack recorded in {path}")
    state = json.loads(path.read_text())
    left = kill_run(state["run_id"], state.get("pgid"), state.get("pid"), timeout)
    if not left:
        path.unlink()
        shutil.rmtree(stack_tmpdir(state["run_id"]), ignore_errors=True)
    return left


def _answers(url: str, timeout: float = 2.0) -> bool:
    try:
        httpx.get(url, timeout=timeout)
        return True
    except httpx.HTTPError:
        return False


def _port_open(url: str, timeout: float = 1.0) -> bool:
    u = urlparse(url)
    try:
        with socket.create_connection((u.hostname, u.port), timeout=timeout):
            return True
    except OSError:
        return False


_sigterm_installed = False


def _install_sigterm_handler() -> None:
    """Turn SIGTERM into SystemExit so `finally`/atexit stop the stack (main thread, default only)."""
    global _sigterm_installed
    if _sigterm_installed or threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return

    def _raise(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _raise)
    _sigterm_installed = True
