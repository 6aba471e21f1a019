"""Training on agents that do not carry token ids back, through Gym's training-token capture.

Owns: the rollout side of Gym 0.7.0's capture for the agents of environments with
`token_capture: true` (megagym/gym/compose.py turns Gym's capture on for them: Gym's model server
records a `TokenEntry` per model call of a rollout in Gym's file store, keyed by the rollout id):
- naming each attempt of such a rollout (`new_rollout_id`, sent as `_ng_rollout_id`, a new id per
  attempt so a retried /run never appends to an earlier attempt's records);
- `TokenCapture.finalize`: after /run, Gym's own finalizer (`envs/token_capture/finalize.py`, a
  worker process under Gym's interpreter, since megagym never imports nemo_gym) freezes the
  rollout's records and rebuilds `response.output` with the three token fields, or masks it.
  A masked build (capture incomplete — Gym marks a lost or unrecorded call —, no records,
  unresolved parent, several chains, an error) is refused: `CaptureRefused` with Gym's reasons,
  recorded by the manager as a failure, never a partial sample. A rebuilt result then becomes a
  `Sample` through `trajectory.trajectory_to_sample`, the same contiguity rules as echoed tokens;
- `TokenCapture.release`: once the sample exists, Gym retires exactly the frozen snapshot; a refused
  or failed rollout keeps its records on disk as evidence.
Must not: import nemo_gym, read Gym's store files itself, or build samples (trajectory.py does).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import uuid
from pathlib import Path

from megagym.gym.config import REPO_ROOT

FINALIZER = REPO_ROOT / "envs" / "token_capture" / "finalize.py"
ROLLOUT_ID_KEY = "_ng_rollout_id"  # Gym's explicit capture key (nemo_gym.global_config.ROLLOUT_ID_KEY_NAME)


class CaptureRefused(Exception):
    """Gym masked the rollout's capture: training on it would train on part of a rollout."""


class CaptureError(RuntimeError):
    """The finalizer worker could not answer (it died or answered an error)."""


def new_rollout_id() -> str:
    """A fresh capture key for one /run attempt (Gym's id pattern: [A-Za-z0-9][A-Za-z0-9._-]*)."""
    return f"mg-{uuid.uuid4().hex}"


def refusal_reason(build: dict) -> str:
    """Why Gym masked a build, from its error and metrics."""
    metrics = build.get("metrics") or {}
    why = []
    if metrics.get("capture_incomplete"):
        why.append("capture incomplete (Gym marked a model call of this rollout as lost or unrecorded)")
    if build.get("error"):
        why.append(f"error: {build['error']}")
    for key in ("unresolved_parent_calls", "quarantined_calls", "empty_generation_calls"):
        if metrics.get(key):
            why.append(f"{key}={metrics[key]}")
    if metrics.get("chains", 1) != 1 or metrics.get("roots", 1) != 1:
        why.append(f"chains={metrics.get('chains')} roots={metrics.get('roots')}")
    return "; ".join(why) or f"masked by Gym's builder (metrics {metrics})"


class TokenCapture:
    """Gym's capture finalizer for one Gym stack's file store, behind one worker process.

    `capture_dir`: the store (`LaunchPlan.token_capture_dir`); `agents`: the agents whose rollouts
    are captured; `python`: Gym's interpreter. The worker starts on first use and ends with
    `close()` or when this process exits (end of its input). Calls are serialized; each one is a
    short file-store read, so they run in a thread and never block the event loop."""

    def __init__(self, capture_dir: str | Path, agents, python: str | Path, log_path: str | Path | None = None):
        self.capture_dir = Path(capture_dir)
        self.agents = set(agents)
        self.python = str(python)
        self.log_path = Path(log_path) if log_path else self.capture_dir.parent / "token_capture_finalizer.log"
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()

    @classmethod
    def for_stack(cls, stack) -> "TokenCapture | None":
        """The capture of a running `GymStack`, or None when none of its environments captures."""
        plan = getattr(stack, "plan", None)
        if plan is None or not plan.capture_agents:
            return None
        python = Path(plan.argv[0]).parent / "python"  # argv[0] is <Gym's venv>/bin/gym
        return cls(plan.token_capture_dir, plan.capture_agents, python, plan.run_dir / "token_capture_finalizer.log")

    def captures(self, agent: str) -> bool:
        return agent in self.agents

    # ------------------------------------------------------------------ worker
    def _start(self) -> subprocess.Popen:
        if not FINALIZER.is_file():
            raise CaptureError(f"Gym-side finalizer {FINALIZER} is missing")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        try:
            return subprocess.Popen([self.python, str(FINALIZER), str(self.capture_dir)], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1)
        finally:
            log.close()

    def _ask(self, request: dict) -> dict:
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._proc = self._start()
            try:
                self._proc.stdin.write(json.dumps(request) + "\n")
                self._proc.stdin.flush()
                line = self._proc.stdout.readline()
            except (BrokenPipeError, OSError) as e:
                line, err = "", e
            else:
                err = None
            if not line:
                code = self._proc.poll()
                self._proc = None
                raise CaptureError(f"Gym's capture finalizer ended (exit code {code}, {err}); "
                                   f"see {self.log_path}")
        answer = json.loads(line)
        if not answer.get("ok"):
            raise CaptureError(f"Gym's capture finalizer: {answer.get('error')}")
        return answer

    def close(self) -> None:
        with self._lock:
            if self._proc is not None:
                self._proc.stdin.close()
                try:
                    self._proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
                self._proc = None

    # ------------------------------------------------------------------ rollouts
    async def finalize(self, result: dict, rollout_id: str) -> dict:
        """`result` rebuilt by Gym from its capture (response.output with token fields).

        Raises `CaptureRefused` when Gym masked the capture, `CaptureError` when the worker failed."""
        body = dict(result)
        body[ROLLOUT_ID_KEY] = rollout_id
        answer = await asyncio.to_thread(self._ask, {"op": "finalize", "result": body})
        build = answer["build"]
        if build["mask_sample"]:
            await self.release(rollout_id, retire=False)
            raise CaptureRefused(f"token capture of rollout {rollout_id} refused: {refusal_reason(build)}")
        rebuilt = answer["result"]
        rebuilt.pop(ROLLOUT_ID_KEY, None)
        rebuilt["_ng_token_capture"] = build["metrics"]
        return rebuilt

    async def release(self, rollout_id: str, retire: bool) -> bool:
        """Retire the frozen capture (`retire`, after the sample exists) or keep it as evidence.

        A worker failure here only leaves the records on disk: it is reported, never raised."""
        try:
            answer = await asyncio.to_thread(self._ask, {"op": "release", "rollout_id": rollout_id, "retire": retire})
        except CaptureError as e:
            print(f"megagym rollout: capture of {rollout_id} not released (kept on disk): {e}", flush=True)
            return False
        return bool(answer["retired"])
