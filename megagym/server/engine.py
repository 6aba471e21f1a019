"""The vLLM engine behind the policy server: lifecycle, generation, and the weight-version hook.

Owns: creating vLLM's `AsyncLLM` in the serving event loop (it belongs to the loop that first
uses it), turning token-id prompts + sampling kwargs into final outputs, aborting requests,
bounded shutdown, `update_weights()` — the in-process hook for changing weights: pause
generation, let the caller move the weights, reset the prefix cache, bump the version, resume —
and `token_boundaries()`, which weight version produced each generated token of an output.

Per-token weight versions are exact by construction, and cost O(1) per engine step: vLLM's
EngineCore stamps every step's outputs with the weight version it holds (`_attach_weight_version`),
the output processor opens a new span when a request's new tokens carry another version
(`RequestState.track_weight_version`), and the final output of each sequence carries the spans
(`CompletionOutput.weight_versions`). Weights and the engine's version change only while
generation is paused (no step runs), and every update sets the engine's version before it resumes
(`finish_weight_update(weight_version=...)` here and in megagym.weights.sync), so a token is
stamped with the version of the weights that computed it. With pause mode "keep" the pause also
drops the frozen requests' KV cache (`clear_cache=True` preempts them), so their tokens after the
switch are computed with the new weights over the whole context, prefix included.

The app keeps two things on `app.state` that weight sync relies on (megagym/weights/sync/routes.py
mounts on the same app and uses them): `engine` — the `AsyncLLM` itself — and `weight_version`,
an int reported by `/health` and every response. Whoever changes the weights sets
`app.state.weight_version`; this module's hook does it for in-process callers.
Must not: parse HTTP or chat messages (app.py / tokens.py), or move weights itself.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Awaitable, Callable, Literal

from megagym.server.config import ServerConfig

log = logging.getLogger("megagym.server")

WeightUpdate = Callable[[Any], Awaitable[Any]]  # receives the AsyncLLM, moves the weights


def engine_args(cfg: ServerConfig):
    from vllm.engine.arg_utils import AsyncEngineArgs

    kwargs: dict[str, Any] = dict(
        model=cfg.model,
        tokenizer=cfg.model,
        served_model_name=cfg.model_name,
        dtype=checkpoint_dtype(cfg),
        max_model_len=cfg.max_model_len,
        enforce_eager=cfg.enforce_eager,
        seed=cfg.seed,
        enable_prefix_caching=cfg.enable_prefix_caching,
        max_num_seqs=cfg.max_num_seqs,
        logprobs_mode=cfg.logprobs_mode,
        tensor_parallel_size=cfg.tensor_parallel_size,
        disable_log_stats=True,
    )
    if has_cuda():
        kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
    else:
        # When chunked prefill cuts a prompt, vLLM discards the token sampled at the cut and rewinds
        # a seeded request's generator by its offset (`Generator.set_offset`), which torch's CPU
        # generator does not have: one seeded request cut that way kills the CPU engine ("CPU
        # Generator does not use offset"). Seeds come from `request_seeds` and from clients, so on
        # CPU prompts are prefilled whole (vLLM then budgets at least max_model_len tokens a step).
        kwargs["enable_chunked_prefill"] = False
    if cfg.weight_sync:
        from megagym.weights.sync.engine_side import engine_kwargs

        kwargs.update(engine_kwargs(cfg.weight_sync))
    kwargs.update(cfg.engine_args)  # anything else AsyncEngineArgs takes
    return AsyncEngineArgs(**kwargs)


def checkpoint_dtype(cfg: ServerConfig) -> str:
    """`dtype: auto` -> the checkpoint's own dtype (config.json `torch_dtype` / `dtype`).

    vLLM's "auto" serves an fp32 checkpoint in bf16 (logprobs then differ from the trainer's by
    ~1e-3); a training server must run the weights it is given unless told otherwise."""
    import json
    from pathlib import Path

    if cfg.dtype != "auto":
        return cfg.dtype
    try:
        hf = json.loads((Path(cfg.model) / "config.json").read_text())
    except (OSError, ValueError):
        return "auto"
    found = hf.get("torch_dtype") or hf.get("dtype") or (hf.get("text_config") or {}).get("torch_dtype")
    return str(found).removeprefix("torch.") if found else "auto"


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def set_cpu_kv_cache(gib: float) -> None:
    """The one place `VLLM_CPU_KVCACHE_SPACE` is set: from `ServerConfig.kv_cache_gib` (CPU only;
    the engine core it starts inherits it)."""
    if not has_cuda():
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, int(round(gib))))


async def start_engine(cfg: ServerConfig) -> Any:
    """A running AsyncLLM for `cfg` (call inside the serving loop, e.g. the app's lifespan)."""
    from vllm.v1.engine.async_llm import AsyncLLM

    set_cpu_kv_cache(cfg.kv_cache_gib)
    llm = AsyncLLM.from_engine_args(engine_args(cfg))
    await llm.update_weight_version(str(cfg.initial_weight_version))
    return llm


async def generate(llm: Any, prompt_ids: list[int], sampling: dict, max_tokens: int, request_id: str):
    """Final RequestOutput for one prompt; raises ValueError on inputs the engine refuses."""
    from vllm.inputs.engine import tokens_input
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    params = SamplingParams(max_tokens=max_tokens, output_kind=RequestOutputKind.FINAL_ONLY, **sampling)
    final = None
    async for out in llm.generate(tokens_input(prompt_ids), params, request_id):
        final = out
    if final is None:
        raise RuntimeError(f"engine returned no output for {request_id}")
    return final


def token_boundaries(completion: Any, fallback_version: int) -> list[list[int]]:
    """`[[start_index, version], ...]` (megagym.token_versions form) of one finished sequence.

    From vLLM's spans (`completion.weight_versions`, `[version, start, end)` over the output
    tokens); empty spans are skipped and consecutive equal versions merged. Without spans (no
    token, or an engine that does not report them) the whole generation is `fallback_version`.
    """
    out: list[list[int]] = []
    for span in getattr(completion, "weight_versions", None) or ():
        if span.end <= span.start:
            continue
        try:
            version = int(span.version)
        except (TypeError, ValueError):  # "default": an engine whose version was never set
            version = fallback_version
        if out and out[-1][1] == version:
            continue
        out.append([0 if not out else int(span.start), version])
    return out or [[0, int(fallback_version)]]


async def abort(llm: Any, request_id: str) -> None:
    try:
        await llm.abort(request_id)
    except Exception:  # already finished
        pass


def shutdown(llm: Any, cfg: ServerConfig) -> None:
    # Blocking but bounded: vLLM force-kills EngineCore after the timeout.
    llm.shutdown(timeout=cfg.shutdown_timeout_s)


async def update_weights(
    state: Any,
    apply: WeightUpdate,
    *,
    version: int | None = None,
    mode: Literal["wait", "abort", "keep"] = "wait",
    timeout_s: float = 600.0,
) -> int:
    """The weight-update hook for in-process callers; `state` is the app's `app.state`.

    Pauses generation (`mode`: "wait" lets in-flight requests finish on the old weights, "abort"
    ends them with partial output, "keep" freezes them so they continue on the new weights; their
    answers then say where the version changed, see `token_boundaries`),
    runs `await apply(state.engine)`, resets the prefix cache, sets `state.weight_version` to
    `version` (default: +1) and the engine's version, and always resumes. Requests that arrive
    meanwhile wait for the resume. Updates are serialized. Returns the new version.
    """
    llm = state.engine
    lock = getattr(state, "weight_update_lock", None)
    if lock is None:
        lock = state.weight_update_lock = asyncio.Lock()
    async with lock:
        await asyncio.wait_for(llm.pause_generation(mode=mode, clear_cache=True), timeout_s)
        try:
            await asyncio.wait_for(apply(llm), timeout_s)
            await llm.reset_prefix_cache()
            new_version = int(state.weight_version) + 1 if version is None else int(version)
            await llm.update_weight_version(str(new_version))
            state.weight_version = new_version
        finally:
            await asyncio.wait_for(llm.resume_generation(), timeout_s)
    log.info("weights updated to version %d", state.weight_version)
    return state.weight_version


def updating(state: Any) -> bool:
    lock = getattr(state, "weight_update_lock", None)
    sync = getattr(state, "weight_sync", None)
    return bool((lock is not None and lock.locked()) or (sync is not None and getattr(sync, "active", False)))
