"""HTTP control plane of weight sync: a FastAPI `APIRouter` the policy server mounts.

Mount with one line: `app.include_router(megagym.weights.sync.routes.router)`.

It expects on `app.state`:
- `engine`: the vLLM `AsyncLLM`, created with `**engine_side.engine_kwargs(backend)`;
- `weight_version` (int, optional; 0 if missing): set to the new version after each update;
- `weight_sync`: created here on first use (an `engine_side.WeightSyncState`).

Routes (JSON object bodies, read strictly: invalid JSON, another content type, a field the
route does not take or a value of the wrong type answer 400 naming it and never start an update;
during an update a malformed `/weights/update` or `/weights/finish` body abandons the update
and resumes serving, as a rejected bucket does. Errors answer `{"error": "..."}` with 400 for a
refused/failed update, 409 when another update is in progress, 503 `{"error": "engine dead: ..."}`
when the engine has died, so that a trainer can tell a dead server from a refused update):
- `POST /weights/init`   `{"init_info": {...}}` -> backend rendezvous (once per trainer);
- `POST /weights/start`  `{"pause_mode": "wait"|"abort"|"keep"}` -> pause + start_weight_update
  ("keep": in-flight requests freeze and continue on the new weights after the update);
- `POST /weights/update` `{"update_info": {...} | [...]}` -> one bucket;
- `POST /weights/finish` `{"weight_version": int|null}` -> finish, reset caches, resume;
  answers `{"weight_version": N, "timings": {phase: seconds}}`;
- `POST /weights/abort`  -> abandon the update in progress (old weights stay), resume;
- `GET  /weights/info`   -> `{"weight_version", "active", "consistent", "world_size"}`
  (`consistent` is False after an update was abandoned part-way; the next full update fixes it).

Must not: create or shut down the engine, or carry tensor bytes (they go through the backend's
data plane: /dev/shm, NCCL, CUDA IPC).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from megagym.weights.sync.engine_side import PAUSE_MODES, WeightSyncBusy, WeightSyncError, WeightSyncState

router = APIRouter(prefix="/weights", tags=["weight-sync"])


def sync_state(app) -> WeightSyncState:
    state = getattr(app.state, "weight_sync", None)
    if state is None:
        state = WeightSyncState(weight_version=int(getattr(app.state, "weight_version", 0) or 0),
                                on_version=lambda v: setattr(app.state, "weight_version", v))
        app.state.weight_sync = state
    return state


def _engine(request: Request):
    engine = getattr(request.app.state, "engine", None)
    if engine is None:
        raise WeightSyncError("the server has no engine (app.state.engine is not set)")
    return engine


class BadBody(WeightSyncError):
    """A malformed request body: refused before it can start, change or finish an update."""


def _no_constants(name: str):
    raise ValueError(f"{name} is not a JSON number")


async def _body(request: Request, fields: dict[str, tuple[type, ...]]) -> dict[str, Any]:
    """The JSON object body, each field of one of its allowed types (an empty body is {})."""
    kind = request.headers.get("content-type")
    if kind is not None and kind.split(";", 1)[0].strip().lower() != "application/json":
        raise BadBody(f"content-type: {kind!r} is not accepted; send application/json")
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw, parse_constant=_no_constants)
    except (ValueError, RecursionError) as exc:
        raise BadBody(f"body: invalid JSON ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(body, dict):
        raise BadBody("body: expected a JSON object")
    for key, value in body.items():
        if key not in fields:
            raise BadBody(f"{key}: not a field of {request.url.path} (accepted: {', '.join(fields) or 'none'})")
        if not isinstance(value, fields[key]) or (isinstance(value, bool) and bool not in fields[key]):
            raise BadBody(f"{key}: expected {' or '.join(t.__name__ for t in fields[key])}, got {type(value).__name__}")
    return body


async def _abandoning(request: Request, exc: BadBody) -> BadBody:
    """During an update a malformed body also abandons it: nothing stays paused."""
    state = getattr(request.app.state, "weight_sync", None)
    if state is None or not state.active:
        return exc
    await state.abort(_engine(request))
    return BadBody(f"{exc}; the weight update in progress was abandoned and serving resumed "
                   f"(weight version stays {state.weight_version})")


async def _run(request: Request, step) -> JSONResponse:
    try:
        return JSONResponse(await step(sync_state(request.app), _engine(request)))
    except WeightSyncBusy as exc:
        return JSONResponse({"error": str(exc)}, status_code=409)
    except (WeightSyncError, ValueError) as exc:
        engine = getattr(request.app.state, "engine", None)
        if getattr(engine, "errored", False) is True:
            return JSONResponse({"error": f"engine dead: {exc}"}, status_code=503)
        return JSONResponse({"error": str(exc)}, status_code=400)


def _refused(exc: WeightSyncError) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=400)


@router.post("/init")
async def init(request: Request):
    try:
        init_info = (await _body(request, {"init_info": (dict,)})).get("init_info", {})
    except BadBody as exc:
        return _refused(exc)

    async def step(state, engine):
        try:
            await state.init(engine, init_info)
        except WeightSyncError:
            raise
        except Exception as exc:
            raise WeightSyncError(f"init_weight_transfer_engine failed: {exc}") from exc
        return {"weight_version": state.weight_version}

    return await _run(request, step)


@router.post("/start")
async def start(request: Request):
    try:
        pause_mode = (await _body(request, {"pause_mode": (str,)})).get("pause_mode", "wait")
    except BadBody as exc:
        return _refused(exc)
    if pause_mode not in PAUSE_MODES:
        return _refused(BadBody(f"pause_mode: must be one of {list(PAUSE_MODES)}, got {pause_mode!r}"))

    async def step(state, engine):
        await state.start(engine, pause_mode=pause_mode)
        return {"status": "started"}

    return await _run(request, step)


@router.post("/update")
async def update(request: Request):
    try:
        update_info = (await _body(request, {"update_info": (dict, list)})).get("update_info")
        if update_info is None or (isinstance(update_info, list) and not all(isinstance(b, dict) for b in update_info)):
            raise BadBody("update_info: required, an object or a list of objects")
    except BadBody as exc:
        return _refused(await _abandoning(request, exc))

    async def step(state, engine):
        await state.update(engine, update_info)
        return {"bucket": state.buckets}

    return await _run(request, step)


@router.post("/finish")
async def finish(request: Request):
    try:
        weight_version = (await _body(request, {"weight_version": (int, type(None))})).get("weight_version")
    except BadBody as exc:
        return _refused(await _abandoning(request, exc))

    async def step(state, engine):
        version = await state.finish(engine, weight_version)  # sets app.state.weight_version
        return {"weight_version": version, "timings": state.timings}

    return await _run(request, step)


@router.post("/abort")
async def abort(request: Request):
    async def step(state, engine):
        await state.abort(engine)
        return {"weight_version": state.weight_version}

    return await _run(request, step)


@router.get("/info")
async def info(request: Request):
    async def step(state, engine):
        parallel = engine.vllm_config.parallel_config
        return {
            "weight_version": state.weight_version,
            "active": state.active,
            "consistent": state.consistent,
            "world_size": parallel.world_size_across_dp,
        }

    return await _run(request, step)
