"""The vLLM engine behind the policy server: lifecycle, generation, and the weight-update hook.

Owns: creating vLLM's `AsyncLLM` in the serving event loop (it belongs to the loop that first
uses it), turning token-id prompts + sampling kwargs into final outputs, aborting requests whose
client went away, bounded shutdown, and the weight version. `update_weights()` is the one place a
weight-sync backend (megagym/weights/sync/) calls: it pauses generation, lets the backend move the
weights, clears the prefix cache, bumps the version and resumes — in that order, always resuming.
Must not: parse HTTP or chat messages (that is app.py / tokens.py), or move weights itself.
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
        dtype=cfg.dtype,
        max_model_len=cfg.max_model_len,
        enforce_eager=cfg.enforce_eager,
        seed=cfg.seed,
        enable_prefix_caching=cfg.enable_prefix_caching,
        max_num_seqs=cfg.max_num_seqs,
        logprobs_mode=cfg.logprobs_mode,
        tensor_parallel_size=cfg.tensor_parallel_size,
        disable_log_stats=True,
    )
    if _has_cuda():
        kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
    kwargs.update(cfg.engine_args)  # e.g. worker_extension_cls, weight_transfer_config
    return AsyncEngineArgs(**kwargs)


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


class Engine:
    """One AsyncLLM plus the weight version. Create with `await Engine.start(cfg)` inside the loop."""

    def __init__(self, cfg: ServerConfig, llm: Any) -> None:
        self.cfg = cfg
        self.llm = llm
        self.weight_version = cfg.initial_weight_version
        self._update_lock = asyncio.Lock()
        self.updating = False
        self.vocab_size = int(llm.model_config.get_vocab_size())
        self.max_model_len = int(llm.model_config.max_model_len)

    @classmethod
    async def start(cls, cfg: ServerConfig) -> "Engine":
        from vllm.v1.engine.async_llm import AsyncLLM

        if not _has_cuda():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(round(cfg.kv_cache_gib)))))
        llm = AsyncLLM.from_engine_args(engine_args(cfg))
        engine = cls(cfg, llm)
        await llm.update_weight_version(str(engine.weight_version))
        return engine

    # -- generation -----------------------------------------------------------------------------

    async def generate(self, prompt_ids: list[int], sampling: dict, max_tokens: int, request_id: str):
        """Final RequestOutput for one prompt; raises ValueError on inputs the engine refuses."""
        from vllm.inputs.engine import tokens_input
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        params = SamplingParams(max_tokens=max_tokens, output_kind=RequestOutputKind.FINAL_ONLY, **sampling)
        final = None
        async for out in self.llm.generate(tokens_input(prompt_ids), params, request_id):
            final = out
        if final is None:
            raise RuntimeError(f"engine returned no output for {request_id}")
        return final

    async def abort(self, request_id: str) -> None:
        try:
            await self.llm.abort(request_id)
        except Exception:  # the request may already be finished
            pass

    @property
    def healthy(self) -> bool:
        return not self.llm.errored

    # -- weights ----------------------------------------------------------------------------------

    async def update_weights(
        self,
        apply: WeightUpdate,
        *,
        version: int | None = None,
        mode: Literal["keep", "wait", "abort"] = "keep",
        timeout_s: float = 600.0,
    ) -> int:
        """Pause generation, run `await apply(llm)`, reset the prefix cache, bump the version, resume.

        `mode` is what happens to in-flight requests while paused: "keep" freezes them and lets them
        continue on the new weights (their tokens then span two versions), "wait" drains them
        first, "abort" ends them with partial output. Requests arriving meanwhile wait for resume.
        Returns the new weight version (`version` or the old one + 1). Updates are serialized.
        """
        async with self._update_lock:
            self.updating = True
            try:
                await asyncio.wait_for(self.llm.pause_generation(mode=mode, clear_cache=True), timeout_s)
                try:
                    await asyncio.wait_for(apply(self.llm), timeout_s)
                    await self.llm.reset_prefix_cache()
                    self.weight_version = self.weight_version + 1 if version is None else int(version)
                    await self.llm.update_weight_version(str(self.weight_version))
                finally:
                    await asyncio.wait_for(self.llm.resume_generation(), timeout_s)
            finally:
                self.updating = False
        log.info("weights updated to version %d", self.weight_version)
        return self.weight_version

    # -- lifecycle ------------------------------------------------------------------------------

    async def shutdown(self) -> None:
        # Blocking, but bounded: EngineCore is force-killed after `timeout` seconds.
        self.llm.shutdown(timeout=self.cfg.shutdown_timeout_s)
