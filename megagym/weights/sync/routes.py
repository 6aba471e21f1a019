"""HTTP control plane of weight sync: a FastAPI `APIRouter` the policy server mounts.

Mount with one line: `app.include_router(megagym.weights.sync.routes.router)`.

It expects on `app.state`:
- `engine`: the vLLM `AsyncLLM`, created with `**engine_side.engine_kwargs(backend)`;
- `weight_version` (int, optional; 0 if missing): set to the new version after each update;
- `weight_sync`: created here on first use (an `engine_side.WeightSyncState`).

Routes (JSON bodies; errors answer `{"error": "..."}` with 400 for a refused/failed update,
409 when another update is in progress):
- `POST /weights/init`   `{"init_info": {...}}` -> backend rendezvous (once per trainer);
- `POST /weights/start`  `{"pause_mode": "wait"|"abort"}` -> pause + start_weight_update;
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

from typing import Any

from fastapi import APIRouter, Body, Request
from fastapi.responses import JSONResponse

from megagym.weights.sync.engine_side import WeightSyncBusy, WeightSyncError, WeightSyncState

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


async def _run(request: Request, step) -> JSONResponse:
    try:
        return JSONResponse(await step(sync_state(request.app), _engine(request)))
    except WeightSyncBusy as exc:
        return JSONResponse({"error": str(exc)}, status_code=409)
    except (WeightSyncError, ValueError) as exc:
        return JSONResponse({"error": str(exc)}, status_code=400)


@router.post("/init")
async def init(request: Request, init_info: dict[str, Any] = Body(default_factory=dict, embed=True)):
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
async def start(request: Request, pause_mode: str = Body("wait", embed=True)):
    async def step(state, engine):
        await state.start(engine, pause_mode=pause_mode)
        return {"status": "started"}

    return await _run(request, step)


@router.post("/update")
async def update(request: Request, update_info: dict[str, Any] | list[dict[str, Any]] = Body(..., embed=True)):
    async def step(state, engine):
        await state.update(engine, update_info)
        return {"bucket": state.buckets}

    return await _run(request, step)


@router.post("/finish")
async def finish(request: Request, weight_version: int | None = Body(None, embed=True)):
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
