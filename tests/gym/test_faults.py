"""Faults on a Gym stack of its own: a resources server killed mid-batch, a policy server that hangs.

The stack runs megagym's lowercase_words twice — the catalog entry and a second instance defined
inline in the run config (a new environment through configuration only) — behind a proxy in front
of the session's policy server that never answers requests containing HANG-ME. The batch must
finish with exactly the affected rollouts marked failed (with their reasons) and nothing else
lost; the dead server must be reported; `megagym gym stop` must leave no process of the run.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request, Response

from megagym.config.schema import RunConfig
from megagym.config import load
from megagym.gym import GymStack
from megagym.rollout.batches import BatchSource, GymDied
from megagym.gym.cli import main as gym_cli
from megagym.gym.compose import free_port
from megagym.gym.kill import marker_pids
from megagym.gym.rows import load_env_rows
from megagym.rollout import RolloutConfig, RolloutManager

pytestmark = [pytest.mark.gym, pytest.mark.slow]

SECOND_ENV = """\
lowercase_words_b:
  resources_servers:
    lowercase_words:
      entrypoint: app.py
      domain: other
      verified: false
      description: second instance of lowercase_words
lowercase_words_b_agent:
  responses_api_agents:
    simple_agent:
      entrypoint: app.py
      max_steps: 1
      resources_server: {type: resources_servers, name: lowercase_words_b}
      model_server: {type: responses_api_models, name: policy_model}
lowercase_words_b_environment_server:
  environment_servers:
    legacy_agent:
      entrypoint: app.py
      agent_server: {type: responses_api_agents, name: lowercase_words_b_agent}
"""


class HangingProxy:
    """Forwards to the policy server; requests whose body contains HANG-ME never get an answer."""

    def __init__(self, upstream: str):
        app = FastAPI()
        self.hung = 0

        @app.api_route("/{path:path}", methods=["GET", "POST"])
        async def proxy(path: str, request: Request):
            body = await request.body()
            if b"HANG-ME" in body:
                self.hung += 1
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:  # proxy shutting down: end quietly
                    return Response(status_code=503)
            async with httpx.AsyncClient(timeout=120) as c:
                r = await c.request(request.method, f"{upstream}/{path}", content=body,
                                    headers={"content-type": request.headers.get("content-type", "application/json")})
            return Response(r.content, status_code=r.status_code, media_type=r.headers.get("content-type"))

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


def test_killed_server_and_hung_policy(policy, tmp_path):
    url, model = policy
    (tmp_path / "lowercase_words_b.yaml").write_text(SECOND_ENV)
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(f"""
run: {{output_dir: {tmp_path}/run}}
env:
  environments: [lowercase_words, lowercase_words_b]
  definitions:
    lowercase_words_b:
      gym_configs: [{tmp_path}/lowercase_words_b.yaml]
      agent: lowercase_words_b_agent
      extra_roots: [envs]
      train_data: envs/resources_servers/lowercase_words/data/train.jsonl
  policy_model_name: {model}
  start_timeout_s: 300
""")
    with HangingProxy(url.removesuffix("/v1")) as proxy:
        cfg = load(RunConfig, run_yaml, [f"env.policy_base_urls=[http://127.0.0.1:{proxy.port}/v1]"])
        stack = GymStack.start(cfg.env, run_dir=tmp_path / "run" / "gym")
        try:
            rows = load_env_rows(cfg.env, "train", limit=6)
            a_rows = [r for r in rows if r["agent_ref"]["name"] == "lowercase_words_simple_agent"][:3]
            # rows without agent_ref in the data get their environment's agent: the second instance
            b_rows = [dict(r, agent_ref={"type": "responses_api_agents", "name": "lowercase_words_b_agent"})
                      for r in rows[:4]]
            hang_rows = [{"responses_create_params": {"input": [{"role": "user", "content": f"HANG-ME {i}"}]},
                          "agent_ref": {"name": "lowercase_words_simple_agent"}} for i in range(2)]
            batch = a_rows + b_rows + hang_rows
            kinds = ["a"] * len(a_rows) + ["b"] * len(b_rows) + ["hang"] * len(hang_rows)
            # Small and quick on purpose: Gym's own watchdog (every 60 s after start-up) ends the whole
            # stack once it sees the killed server, and this batch must be done before that.
            rc = RolloutConfig(n=2, max_output_tokens=16, max_concurrency=6, request_timeout_s=10, max_retries=1,
                               backoff_s=0.2, progress=False)
            mgr = RolloutManager(rc, stack)
            victim = stack.server_pid("lowercase_words_b")

            async def run():
                out, killed = [], False
                async for g in mgr.generate(batch):
                    out.append(g)
                    if not killed:
                        os.kill(victim, signal.SIGKILL)
                        killed = True
                return out

            t0 = time.monotonic()
            groups = asyncio.run(run())
            print(f"fault batch: {time.monotonic() - t0:.1f}s")
            assert sorted(g.row_index for g in groups) == list(range(len(batch)))
            b_failures = []
            for g in groups:
                kind = kinds[g.row_index]
                assert len(g.samples) + len(g.failures) == rc.n, "every rollout is either a sample or a failure"
                if kind == "a":
                    assert g.failures == [] and len(g.samples) == rc.n
                elif kind == "hang":
                    assert g.samples == [] and all(f.startswith("timeout") for f in g.failures), g.failures
                else:
                    b_failures += g.failures
            assert b_failures, "rollouts after the kill must fail"
            assert all("gym server dead: 'lowercase_words_b'" in f for f in b_failures), b_failures
            assert "lowercase_words_b" in mgr.dead_reported
            assert "lowercase_words_b" in stack.dead_servers()
            assert proxy.hung >= 2
            m = mgr.metrics.summary()
            assert m["rollout/lowercase_words/failures"] == 2 * rc.n
            assert m["rollout/lowercase_words_b/failures"] == len(b_failures)
            # the training loop does not go on with a dead Gym server: it stops before taking prompts
            source = BatchSource(cfg, stack)
            before = source.cursor.state_dict()
            with pytest.raises(GymDied, match="lowercase_words_b"):
                source.next()
            assert source.cursor.state_dict() == before
        finally:
            # stop through the CLI (state file in the run directory), then check nothing is left
            rc_stop = gym_cli(["stop", str(run_yaml)])
            stack.stop()
            left = marker_pids(stack.run_id)
        assert rc_stop == 0 and left == [], f"left after stop: {left}"


def test_start_timeout_names_what_is_missing_and_cleans_up(policy, tmp_path):
    from megagym.gym.compose import compose
    from megagym.gym.config import GymConfig
    from megagym.gym.errors import GymError

    url, model = policy
    plan = compose(GymConfig(environments=["lowercase_words"]), [url], model, run_dir=tmp_path)
    stack = GymStack(plan, start_timeout_s=3, stop_timeout_s=10)
    stack.launch()
    try:
        with pytest.raises(GymError, match=r"(did not answer|did not come up) within 3s \(env.start_timeout_s\)"):
            stack.wait_ready()
    finally:
        left = stack.stop()
    assert left == [] and marker_pids(plan.run_id) == []


def test_head_port_taken_before_gym_binds_it(policy, tmp_path, monkeypatch):
    """Gym binds its head server only after Ray has started, so a port megagym picked can be gone
    by then (seen in CI: Gym then waited for its dead head server until the 180 s timeout). A port
    megagym picked is retried on a new one; a port the user chose fails at once, naming it."""
    import socket

    from megagym.gym import compose as compose_module
    from megagym.gym.config import GymConfig
    from megagym.gym.stack import HeadPortTaken

    url, model = policy
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        handed = iter([taken])  # the first port compose draws is already in use
        launched, launch = [], GymStack.launch
        monkeypatch.setattr(GymStack, "launch", lambda self: (launch(self), launched.append(self.plan.run_id)))
        monkeypatch.setattr(compose_module, "free_port", lambda host: next(handed, None) or free_port(host))
        t0 = time.monotonic()
        stack = GymStack.start(GymConfig(environments=["lowercase_words"], start_timeout_s=300), [url], model,
                               run_dir=tmp_path / "picked")
        try:
            assert stack.head_url != f"http://127.0.0.1:{taken}"
            assert "address already in use" in (tmp_path / "picked" / "gym.log").read_text()
            assert httpx.get(f"{stack.head_url}/readyz", timeout=5).status_code == 200
        finally:
            assert stack.stop() == []
        retried_s = time.monotonic() - t0

        fixed = GymConfig(environments=["lowercase_words"], start_timeout_s=300, head_port=taken)
        t0 = time.monotonic()
        with pytest.raises(HeadPortTaken, match=f"could not bind 127.0.0.1:{taken}: address already in use"):
            GymStack.start(fixed, [url], model, run_dir=tmp_path / "fixed")
        assert time.monotonic() - t0 < min(retried_s, 300), "the taken port was not noticed before the timeout"
    assert len(launched) == 3 and all(marker_pids(run_id) == [] for run_id in launched), "processes are left"


def test_sigterm_to_the_owner_stops_the_whole_stack(policy, tmp_path):
    """The process that started Gym gets SIGTERM while Gym (and Ray) start: nothing may be left."""
    import json
    import subprocess
    import sys

    url, model = policy
    script = f"""
from megagym.gym import GymConfig, GymStack
GymStack.start(GymConfig(environments=["lowercase_words"], start_timeout_s=300), [{url!r}], {model!r},
               run_dir={str(tmp_path)!r})
"""
    child = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    state = tmp_path / "gym_stack.json"
    try:
        deadline = time.monotonic() + 120
        run_id = None
        while time.monotonic() < deadline and child.poll() is None:
            if state.exists():
                run_id = json.loads(state.read_text())["run_id"]
                if len(marker_pids(run_id)) >= 3:  # gym env start and some of its servers or Ray
                    break
            time.sleep(0.5)
        assert run_id is not None and child.poll() is None, "Gym did not start in the child"
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=90) != 0
    finally:
        if child.poll() is None:
            child.kill()
    assert marker_pids(run_id) == []
