"""The rollout manager: Gym rows in, finished `RolloutGroup`s out, in completion order.

Owns: taking Gym rows (read by `megagym.gym.rows`), stamping the sampling parameters and `max_output_tokens` into every row, sending `n`
rollouts per row (a group) to the row's agent `POST {agent}/run` under one concurrency bound,
bounding every request in time, retrying transport errors, timeouts and HTTP 5xx with exponential
back-off, failing fast when a Gym server the agent needs is dead, turning results into `Sample`s
(`trajectory.py`) and streaming each group back as soon as its last rollout finishes.

Failure policy: a rollout that still fails after its retries (or whose Gym server is dead, or
whose trajectory has no generated tokens) is recorded in its group's `failures` with its reason
and left out of `samples`; the group keeps its other samples (GRPO's baseline is then taken over
them) unless `rollout.drop_group_on_failure` drops the whole group. The batch always goes on.
A broken token contiguity is not a failure but a bug: `ContiguityError` ends the batch.
Agents of environments with `token_capture` do not carry token ids back: their rollouts go out with
a fresh `_ng_rollout_id` per attempt and their samples are built from Gym's capture (`capture.py`);
a capture Gym masks (incomplete, ambiguous) is a failure with Gym's reasons.
Must not: import nemo_gym or torch, or change a row beyond the stamped fields.
"""

from __future__ import annotations

import asyncio
import copy
import random
import time
from dataclasses import dataclass
from typing import AsyncIterator, Sequence

import httpx

from megagym.rollout.capture import ROLLOUT_ID_KEY, CaptureError, CaptureRefused, TokenCapture, new_rollout_id
from megagym.rollout.config import RolloutConfig
from megagym.rollout.metrics import Progress, RolloutMetrics
from megagym.rollout.trajectory import ContiguityError, TrajectoryError, model_calls, trajectory_to_sample
from megagym.token_versions import generation_key
from megagym.types import RolloutGroup, Sample

def stamp_row(row: dict, cfg: RolloutConfig) -> dict:
    """A copy of `row` whose sampling parameters are the training ones."""
    body = copy.deepcopy(row)
    params = body.setdefault("responses_create_params", {})
    params["temperature"] = cfg.temperature
    params["top_p"] = cfg.top_p
    params["max_output_tokens"] = cfg.max_output_tokens
    return body


@dataclass
class _Done:
    row_index: int
    result: dict | None = None
    failure: str | None = None
    version: int = 0  # the servers' weight version when the rollout started (fallback stamp)
    call_versions: list | None = None  # per model call: boundaries from the serving policy server
    call_servers: list | None = None  # per model call: which policy server had its record
    rollout_id: str | None = None  # Gym's capture key of the attempt that answered (token capture)
    capture_held: bool = False  # Gym holds a frozen capture build until `release`


class RolloutManager:
    """Runs groups of rollouts through Gym agents and streams `RolloutGroup`s back.

    `agents` maps agent instance names to base URLs and `agent_to_env` names the environment of
    each agent (both come from a running `GymStack`, which also answers which servers are dead).
    """

    def __init__(self, cfg: RolloutConfig, stack=None, *, agents: dict[str, str] | None = None,
                 agent_to_env: dict[str, str] | None = None, success_threshold: float = 1.0,
                 keep_results: bool = False, transport: httpx.AsyncBaseTransport | None = None,
                 policy_servers: Sequence[str] = (), api_key: str | None = None,
                 capture: TokenCapture | None = None):
        self.cfg = cfg
        self.stack = stack
        self.agents = dict(agents if agents is not None else (stack.agents if stack else {}))
        self.agent_to_env = dict(agent_to_env if agent_to_env is not None else
                                 (stack.agent_to_env if stack else {}))
        if not self.agents:
            raise ValueError("RolloutManager needs a GymStack or an agents mapping")
        self.weight_version = 0
        self.success_threshold = success_threshold
        self.metrics = RolloutMetrics(success_threshold)
        self.dead_reported: dict[str, str] = {}
        self.keep_results = keep_results  # keep raw /run answers in `results[row_index]` (debugging, tests)
        self.results: dict[int, list[dict]] = {}
        self._transport = transport  # tests inject a fake transport
        # where each model call's token versions are looked up (policy server base URLs, no /v1)
        self.policy_servers = [u.rstrip("/") for u in policy_servers]
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # Gym's token capture for agents that do not echo token ids (None: no such agent)
        self.capture = capture if capture is not None else TokenCapture.for_stack(stack)

    # ------------------------------------------------------------------ public API
    def agent_of(self, row: dict, row_index: int) -> str:
        ref = row.get("agent_ref")
        name = ref.get("name") if isinstance(ref, dict) else None
        if not name:
            raise ValueError(f"row {row_index} has no agent_ref.name (load rows with "
                             "megagym.gym.rows.load_env_rows, which stamps each environment's agent)")
        if name not in self.agents:
            raise ValueError(f"row {row_index} routes to agent '{name}', which this Gym stack does not "
                             f"run (agents: {', '.join(sorted(self.agents))})")
        return name

    async def generate(self, rows: Sequence[dict], indices: Sequence[int] | None = None
                       ) -> AsyncIterator[RolloutGroup]:
        """Yield one `RolloutGroup` per row, in completion order; `row_index` = indices[i] (or i)."""
        indices = list(range(len(rows))) if indices is None else list(indices)
        if len(indices) != len(rows):
            raise ValueError(f"{len(rows)} rows but {len(indices)} indices")
        for row, i in zip(rows, indices):
            self.agent_of(row, i)  # every row routes somewhere before anything starts
        self.metrics = metrics = RolloutMetrics(self.success_threshold)
        progress = Progress(len(rows) * self.cfg.n, self.cfg.progress)
        sem = asyncio.Semaphore(self.cfg.max_concurrency)
        t0 = time.monotonic()
        self.results = {}
        async with self.client() as client:
            tasks = [asyncio.create_task(self.run_group(client, sem, row, i, metrics, progress))
                     for row, i in zip(rows, indices)]
            try:
                for next_done in asyncio.as_completed(tasks):
                    group = await next_done
                    metrics.seconds = time.monotonic() - t0
                    yield group
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                progress.close()
                metrics.seconds = time.monotonic() - t0

    def client(self) -> httpx.AsyncClient:
        """The HTTP client rollouts share (connections bounded by `max_concurrency`)."""
        limits = httpx.Limits(max_connections=self.cfg.max_concurrency,
                              max_keepalive_connections=self.cfg.max_concurrency)
        return httpx.AsyncClient(limits=limits, timeout=self.cfg.request_timeout_s, transport=self._transport)

    async def run_group(self, client: httpx.AsyncClient, sem: asyncio.Semaphore, row: dict, row_index: int,
                        metrics: RolloutMetrics, progress: Progress | None = None) -> RolloutGroup:
        """The `n` rollouts of one row (each holding `sem` while it runs) as one `RolloutGroup`."""
        agent = self.agent_of(row, row_index)
        body = stamp_row(row, self.cfg)

        async def one() -> _Done:
            async with sem:
                done = await self._run_one(client, agent, body, row_index)
            if progress is not None:
                progress.update(done.result.get("reward") if done.result else None)
            return done

        dones = await asyncio.gather(*[one() for _ in range(self.cfg.n)])
        group = self._group(row_index, agent, list(dones), metrics)
        for d in dones:
            if d.capture_held:  # the samples exist: Gym retires their captures, keeps the others
                await self.capture.release(d.rollout_id, retire=d.failure is None)
        metrics.groups += 1
        return group

    def collect(self, rows: Sequence[dict], indices: Sequence[int] | None = None) -> list[RolloutGroup]:
        """Synchronous helper: all groups of `rows`, in completion order."""

        async def _all() -> list[RolloutGroup]:
            return [g async for g in self.generate(rows, indices)]

        return asyncio.run(_all())

    # ------------------------------------------------------------------ internals
    def _group(self, row_index: int, agent: str, dones: list[_Done], metrics: RolloutMetrics) -> RolloutGroup:
        env = self.agent_to_env.get(agent, agent)
        samples: list[Sample] = []
        failures: list[str] = []
        if self.keep_results:
            self.results[row_index] = [d.result for d in dones if d.result is not None]
        for d in dones:
            if d.failure is None:
                try:
                    s = trajectory_to_sample(d.result, row_index, env, d.version, d.call_versions)
                except ContiguityError:
                    raise
                except TrajectoryError as e:
                    d.failure = f"no training sample: {e}"
                else:
                    samples.append(s)
                    metrics.add_sample(s)
                    metrics.add_versions(d.call_versions, d.call_servers)
                    continue
            failures.append(d.failure)
            metrics.add_failure(env, d.failure)
        if failures and self.cfg.drop_group_on_failure:
            samples = []
        return RolloutGroup(row_index=row_index, env=env, samples=samples, failures=failures)

    def _dead_dependency(self, agent: str) -> str | None:
        if self.stack is None:
            return None
        dead = self.stack.dead_servers()
        if not dead:
            return None
        for name, why in dead.items():
            if name not in self.dead_reported:
                self.dead_reported[name] = why
                print(f"megagym rollout: Gym server '{name}' is dead: {why}", flush=True)
        if "gym" in dead:
            return f"gym server dead: {dead['gym']}"
        for name in self.stack.agent_dependencies(agent):
            if name in dead:
                return f"gym server dead: '{name}' ({dead[name]})"
        return None

    async def _run_one(self, client: httpx.AsyncClient, agent: str, body: dict, row_index: int) -> _Done:
        version = self.weight_version
        done = await self._run_once(client, agent, body, row_index)
        done.version = version
        if done.result is not None and done.rollout_id is not None:
            try:
                done.result = await self.capture.finalize(done.result, done.rollout_id)
                done.capture_held = True
            except CaptureRefused as e:
                done.failure = str(e)
            except CaptureError as e:
                done.failure = f"token capture failed: {e}"
        if done.result is not None and self.policy_servers:
            done.call_versions, done.call_servers = await self._call_versions(client, done.result)
        return done

    async def _call_versions(self, client: httpx.AsyncClient, result: dict) -> tuple[list, list]:
        """Per model call of `result`: the weight-version boundaries its policy server recorded, and
        which server that was (None for both where no server has the record)."""
        output = (result.get("response") or {}).get("output")
        calls = model_calls(output) if isinstance(output, list) else []
        keys = []
        for item in calls:
            prompt, gen = item.get("prompt_token_ids"), item.get("generation_token_ids")
            keys.append(generation_key(prompt, gen) if isinstance(prompt, list) and isinstance(gen, list) else None)
        versions: list = [None] * len(keys)
        servers: list = [None] * len(keys)
        for url in self.policy_servers:
            todo = [i for i, k in enumerate(keys) if k is not None and versions[i] is None]
            if not todo:
                break
            try:
                r = await client.post(f"{url}/megagym/token_versions", json={"keys": [keys[i] for i in todo]},
                                      headers=self._headers, timeout=30.0)
                found = r.json()["versions"] if r.status_code == 200 else []
            except (httpx.HTTPError, ValueError, KeyError, TypeError):
                continue  # a dead server: its calls keep the fallback stamp
            for i, b in zip(todo, found):
                if b:
                    versions[i], servers[i] = b, url
        return versions, servers

    async def _run_once(self, client: httpx.AsyncClient, agent: str, body: dict, row_index: int) -> _Done:
        url = f"{self.agents[agent].rstrip('/')}/run"
        cfg = self.cfg
        error = "not attempted"
        attempts = 0
        captured = self.capture is not None and self.capture.captures(agent)
        for attempt in range(cfg.max_retries + 1):
            attempts = attempt + 1
            rollout_id = new_rollout_id() if captured else None
            sent = {**body, ROLLOUT_ID_KEY: rollout_id} if captured else body
            try:
                r = await asyncio.wait_for(client.post(url, json=sent), timeout=cfg.request_timeout_s)
            except (asyncio.TimeoutError, httpx.TimeoutException):
                error = f"timeout: no answer from {agent}/run within {cfg.request_timeout_s:g}s"
            except httpx.TransportError as e:
                error = f"transport error: {type(e).__name__}: {e}"
            else:
                if r.status_code < 400:
                    try:
                        result = r.json()
                    except ValueError:
                        error = f"bad response: {agent}/run answered non-JSON"
                    else:
                        return _Done(row_index, result=result, rollout_id=rollout_id)
                elif r.status_code < 500:
                    return _Done(row_index, failure=f"HTTP {r.status_code}: {agent}/run rejected the row: "
                                                    f"{r.text[:300]}")
                else:
                    error = f"HTTP {r.status_code}: {agent}/run failed: {r.text[:300]}"
            dead = await asyncio.to_thread(self._dead_dependency, agent)
            if dead:
                return _Done(row_index, failure=f"{dead}; last error: {error}")
            if attempt < cfg.max_retries:
                delay = min(cfg.backoff_s * (2 ** attempt), cfg.backoff_max_s)
                await asyncio.sleep(delay * (0.5 + random.random()))
        return _Done(row_index, failure=f"{error} (after {attempts} attempts)")
