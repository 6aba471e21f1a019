"""Engine side of weight sync: the update sequence on an `AsyncLLM`, and the engine arguments.

Owns:
- `engine_kwargs(backend)`: the extra `AsyncEngineArgs` keywords that enable weight transfer
  (`weight_transfer_config`, `worker_extension_cls`) for "shm" (CPU, one host), "nccl" (separate
  GPUs) or "ipc" (colocated GPUs);
- `WeightSyncState`: one per engine (the server keeps it at `app.state.weight_sync`), a lock and
  the sequence pause -> `start_weight_update` -> `update_weights` per bucket ->
  `finish_weight_update(weight_version)` -> prefix-cache reset -> tied lm_head refresh -> resume,
  with `abort` (roll back half-loaded layers, resume) on any failure and a watchdog that aborts
  an update whose trainer went quiet;
- `apply_update(engine, buckets, ...)`: the whole sequence in one call for in-process use.

Pause semantics: `pause_mode="wait"` (default) lets in-flight requests finish on the old weights
before the swap, and requests that arrive meanwhile wait for resume, so no answer mixes weights.
`"abort"` ends in-flight requests at once (finish_reason "abort"); the caller must retry them.
`"keep"` (in-flight updates, asynchronous RL) freezes in-flight requests; the pause drops their KV
cache (`clear_cache=True`), and after the swap they continue on the new weights, recomputing
their context with them. Their answers say which tokens came from which version: the engine's
version is set before resume (`finish_weight_update(weight_version=...)`), and vLLM stamps every
step's tokens with it (see megagym.server.engine.token_boundaries).

Must not: import megatron, FastAPI or HTTP clients, or know how bytes travel (that is the
backend's business; update infos are plain dicts passed through to vLLM).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

WORKER_EXTENSION = "megagym.weights.sync.shm_backend.MegagymWorkerExtension"
# megagym backend name -> vLLM WeightTransferConfig.backend
BACKENDS = {"shm": "megagym_shm", "nccl": "nccl", "ipc": "ipc"}
PAUSE_MODES = ("wait", "abort", "keep")


async def _guarded(engine, coro, poll_s: float = 1.0):
    """Await an engine call, but fail fast if the engine dies meanwhile (vLLM 0.32 leaves a
    collective_rpc pending forever when its worker is killed, e.g. by the OOM killer)."""
    task = asyncio.ensure_future(coro)
    while True:
        done, _ = await asyncio.wait({task}, timeout=poll_s)
        if done:
            return task.result()
        if getattr(engine, "errored", False):
            task.cancel()
            raise WeightSyncError(f"the engine died during a weight-sync call: {engine.dead_error}")


class WeightSyncError(RuntimeError):
    """A weight update was refused or failed; the engine serves its previous weights."""


class WeightSyncBusy(WeightSyncError):
    """Another weight update is in progress on this engine."""


def engine_kwargs(backend: str = "shm") -> dict[str, Any]:
    """Extra `AsyncEngineArgs(...)` keywords that enable weight transfer with `backend`.

    `backend`: "shm" (CPU or one host; megagym's shared-memory engine), "nccl" (trainer and
    engine on separate GPUs), "ipc" (colocated on one GPU; the server also needs
    `VLLM_ALLOW_INSECURE_SERIALIZATION=1` to accept IPC handles over HTTP).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown weight-sync backend {backend!r}; choose one of {sorted(BACKENDS)}")
    return {
        "weight_transfer_config": {"backend": BACKENDS[backend]},
        "worker_extension_cls": WORKER_EXTENSION,
    }


@dataclass
class WeightSyncState:
    """Weight-update bookkeeping for one engine. Create once per engine, reuse for every update.

    `weight_version` mirrors the engine's version (an int, bumped by each finished update);
    `consistent` turns False when an update is abandoned after some bucket loaded (the model
    then mixes layers of two versions at layer granularity) and True again after a full update;
    `on_version` is called with the new version (the router uses it to set
    `app.state.weight_version`).
    """

    weight_version: int = 0
    idle_timeout_s: float = 300.0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    active: bool = False
    initialized: bool = False
    consistent: bool = True  # False after an update abandoned once some bucket had loaded
    last_activity: float = 0.0
    buckets: int = 0
    started_at: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase, last update
    on_version: Callable[[int], None] | None = None  # called with the new version before resume
    _watchdog: asyncio.Task | None = None

    # -- one step each; callers hold no lock between steps, `active` guards the session ------
    async def init(self, engine, init_info: dict[str, Any]) -> None:
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

        async with self.lock:
            if self.active:
                raise WeightSyncBusy("cannot (re)initialise weight transfer during an update")
            await engine.init_weight_transfer_engine(WeightTransferInitRequest(init_info=dict(init_info)))
            self.initialized = True

    async def start(self, engine, pause_mode: str = "wait") -> None:
        if pause_mode not in PAUSE_MODES:
            raise WeightSyncError(f"pause_mode must be one of {PAUSE_MODES}, got {pause_mode!r}")
        async with self.lock:
            if self.active:
                raise WeightSyncBusy("a weight update is already in progress")
            if not self.initialized:
                raise WeightSyncError("weight transfer is not initialised: call init first")
            self.active = True
            self.buckets = 0
            self.timings = {"pause": 0.0, "start": 0.0, "update": 0.0, "finish": 0.0, "resume": 0.0}
            self.started_at = self.last_activity = time.monotonic()
            try:
                await _guarded(engine, engine.pause_generation(mode=pause_mode, clear_cache=True))
                self._lap("pause", self.started_at)
                t0 = time.monotonic()
                await _guarded(engine, engine.start_weight_update())
                self._lap("start", t0)
            except BaseException as exc:
                await self._abort_locked(engine)
                raise WeightSyncError(f"could not start the weight update: {exc}") from exc
            self.last_activity = time.monotonic()  # draining in-flight requests is not idleness
            self._arm_watchdog(engine)

    async def update(self, engine, update_info: dict[str, Any] | list[dict[str, Any]]) -> None:
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        async with self.lock:
            self._require_active("update")
            self.last_activity = t0 = time.monotonic()
            try:
                await _guarded(engine, engine.update_weights(WeightTransferUpdateRequest(update_info=update_info)))
                self._lap("update", t0)
            except BaseException as exc:
                loaded = self.buckets
                await self._abort_locked(engine)
                where = ("no weights changed" if loaded == 0 else
                         f"layers completed by the {loaded} earlier bucket(s) keep their new weights, "
                         "the others were rolled back: send a full update")
                raise WeightSyncError(
                    f"bucket {loaded} was rejected and the update abandoned; the engine keeps "
                    f"serving (weight version stays {self.weight_version}; {where}): {exc}"
                ) from exc
            self.buckets += 1
            self.last_activity = time.monotonic()

    async def finish(self, engine, weight_version: int | None = None) -> int:
        async with self.lock:
            self._require_active("finish")
            new_version = self.weight_version + 1 if weight_version is None else int(weight_version)
            t0 = time.monotonic()
            try:
                await _guarded(engine, engine.finish_weight_update(weight_version=str(new_version)))
                await _guarded(engine, engine.reset_prefix_cache())
                await _guarded(engine, engine.collective_rpc("megagym_refresh_lm_head"))
                self._lap("finish", t0)
            except BaseException as exc:
                await self._abort_locked(engine)
                raise WeightSyncError(f"finishing the weight update failed: {exc}") from exc
            self.weight_version = new_version
            self.consistent = True
            if self.on_version is not None:
                self.on_version(new_version)
            self._end()
            t0 = time.monotonic()
            await engine.resume_generation()
            self._lap("resume", t0)
            log.info("weight update %d done: %d buckets in %.3f s", new_version, self.buckets,
                     time.monotonic() - self.started_at)
            return new_version

    async def abort(self, engine) -> None:
        async with self.lock:
            if self.active:
                await self._abort_locked(engine)

    # -- internals -----------------------------------------------------------------------------
    def _lap(self, phase: str, since: float) -> None:
        self.timings[phase] = self.timings.get(phase, 0.0) + time.monotonic() - since

    def _require_active(self, step: str) -> None:
        if not self.active:
            raise WeightSyncError(f"{step}: no weight update in progress (call start first; an "
                                  "earlier failure or the idle watchdog may have ended it)")

    def _end(self) -> None:
        self.active = False
        if self._watchdog is not None and self._watchdog is not asyncio.current_task():
            self._watchdog.cancel()
        self._watchdog = None

    async def _abort_locked(self, engine) -> None:
        if self.buckets > 0:
            self.consistent = False
        try:
            await _guarded(engine, engine.collective_rpc("megagym_abort_weight_update"))
            await _guarded(engine, engine.reset_prefix_cache())
        except BaseException:
            log.exception("rolling back an abandoned weight update failed")
        finally:
            self._end()
            if not getattr(engine, "errored", False):
                await engine.resume_generation()

    def _arm_watchdog(self, engine) -> None:
        async def watch() -> None:
            while True:
                await asyncio.sleep(max(0.5, self.idle_timeout_s / 4))
                if not self.active:
                    return
                if time.monotonic() - self.last_activity > self.idle_timeout_s and not self.lock.locked():
                    log.error("weight update idle for over %.0f s: abandoning it and resuming",
                              self.idle_timeout_s)
                    await self.abort(engine)
                    return

        self._watchdog = asyncio.get_running_loop().create_task(watch())


async def apply_update(
    engine,
    buckets: Iterable[dict[str, Any]] | AsyncIterable[dict[str, Any]],
    *,
    state: WeightSyncState,
    weight_version: int | None = None,
    pause_mode: str = "wait",
) -> int:
    """Run a whole update on `engine` (transfer already initialised through `state.init`).

    `buckets`: one vLLM update info per bucket. Returns the new weight version. Any failure
    abandons the update (the engine keeps serving the previous weights) and raises
    `WeightSyncError`.
    """
    await state.start(engine, pause_mode=pause_mode)
    try:
        if isinstance(buckets, AsyncIterable):
            async for info in buckets:
                await state.update(engine, info)
        else:
            for info in buckets:
                await state.update(engine, info)
    except BaseException:
        await state.abort(engine)
        raise
    return await state.finish(engine, weight_version)
