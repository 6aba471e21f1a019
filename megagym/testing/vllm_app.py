"""A minimal vLLM HTTP app with the weight-sync router mounted: test-only (weight-sync tests, `bench/refit.py`).

It stands in for the real policy server (`megagym/server/`) so that weight sync can be tested end
to end over HTTP: the engine is an `AsyncLLM` created in the app lifespan with
`engine_kwargs(backend)`, kept at `app.state.engine`, with `app.state.weight_version`, exactly the
contract `megagym.weights.sync.routes` documents. Extra routes, for measuring only:
- `GET  /health`        -> `{"ok": true, "generate_requests": N}` (requests received so far);
- `POST /demo/score`    `{"prompts": [[ids], ...]}` -> per-prompt `prompt_logprobs` of every
  token after the first (teacher forcing, the quantity a trainer computes);
- `POST /demo/generate` `{"prompt": [ids], "max_tokens": n, "hold_file": path?}` -> greedy
  `token_ids`, sampled `logprobs`, `weight_versions` ([version, start, end] spans),
  `t_start`/`t_end` (time.time()).
`hold_file` holds a request in flight without relying on how long it takes: while that file
exists, `vllm_hold.HoldWhileFileExists` (a vLLM logits processor in the engine) blocks the engine's step
before the request's first token and writes `<hold_file>.held`; deleting the file lets it go on.

Run: `python -m megagym.testing.vllm_app --model DIR --port 8123 [--backend shm]
[--dtype bfloat16 --load-format dummy]`; `VLLMTestServer` starts it like a `megagym serve`.
Must not: grow into a second policy server (no OpenAI routes, no token-ID fix); be used by a run.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import Body, FastAPI, Request

from megagym.server.process import ServerProcess

HOLD_PROCESSOR = "megagym.testing.vllm_hold:HoldWhileFileExists"  # loaded in the engine process

def build_app(model: str, backend: str = "shm", max_model_len: int = 512, dtype: str = "float32",
              load_format: str = "auto", gpu_memory_utilization: float | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from megagym.weights.sync.engine_side import engine_kwargs

        args = AsyncEngineArgs(model=model, dtype=dtype, enforce_eager=True, max_model_len=max_model_len,
                               max_num_seqs=16, load_format=load_format, **engine_kwargs(backend),
                               logits_processors=[HOLD_PROCESSOR],
                               **({"gpu_memory_utilization": gpu_memory_utilization}
                                  if gpu_memory_utilization is not None else {}))
        app.state.engine = AsyncLLM.from_engine_args(args)
        app.state.weight_version = 0
        try:
            yield
        finally:
            app.state.engine.shutdown(timeout=20)

    from megagym.weights.sync.routes import router

    app = FastAPI(lifespan=lifespan)
    app.include_router(router)
    app.state.generate_requests = 0

    @app.get("/health")
    async def health(request: Request):
        return {"ok": True, "generate_requests": request.app.state.generate_requests}

    @app.post("/demo/score")
    async def score(request: Request, prompts: list[list[int]] = Body(..., embed=True)):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        engine = request.app.state.engine
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0,
                                output_kind=RequestOutputKind.FINAL_ONLY)

        async def one(ids):
            final = None
            async for out in engine.generate({"prompt_token_ids": ids}, params, uuid.uuid4().hex):
                final = out
            lps = final.prompt_logprobs
            return [lps[i][ids[i]].logprob for i in range(1, len(ids))]

        return {"logprobs": await asyncio.gather(*(one(p) for p in prompts)),
                "weight_version": request.app.state.weight_version}

    @app.post("/demo/generate")
    async def generate(request: Request, prompt: list[int] = Body(..., embed=True),
                       max_tokens: int = Body(16, embed=True), hold_file: str | None = Body(None, embed=True)):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        request.app.state.generate_requests += 1
        engine = request.app.state.engine
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=0, ignore_eos=True,
                                output_kind=RequestOutputKind.FINAL_ONLY,
                                extra_args={"hold_file": hold_file} if hold_file else None)
        t_start = time.time()
        final = None
        async for out in engine.generate({"prompt_token_ids": prompt}, params, uuid.uuid4().hex):
            final = out
        c = final.outputs[0]
        return {
            "token_ids": list(c.token_ids),
            "logprobs": [c.logprobs[i][t].logprob for i, t in enumerate(c.token_ids)],
            "finish_reason": c.finish_reason,
            "weight_versions": [[v.version, v.start, v.end] for v in (c.weight_versions or [])],
            "t_start": t_start,
            "t_end": time.time(),
        }

    return app


@dataclass
class VLLMTestServer(ServerProcess):
    """This app in its own process group (engine children included), started and stopped like a
    `megagym serve` (`ServerProcess`: a free port, /health, SIGTERM then the group), and talked to."""

    backend: str = "shm"
    extra_args: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.base_url

    def argv(self) -> tuple[list[str], dict]:
        return [sys.executable, "-m", "megagym.testing.vllm_app", "--model", str(self.model_path),
                "--port", str(self.port), "--backend", self.backend, *self.extra_args], {}

    def score(self, prompts: list[list[int]]) -> list[list[float]]:
        import requests

        r = requests.post(self.url + "/demo/score", json={"prompts": prompts}, timeout=300)
        r.raise_for_status()
        return r.json()["logprobs"]

    def info(self) -> dict:
        import requests

        r = requests.get(self.url + "/weights/info", timeout=30)
        r.raise_for_status()
        return r.json()

    def generate_requests(self) -> int:
        """How many /demo/generate requests the app has received so far."""
        import requests

        return requests.get(self.url + "/health", timeout=30).json()["generate_requests"]


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from megagym.server.engine import set_cpu_kv_cache

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--backend", default="shm")
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--load-format", default="auto", help="'dummy': random weights, config.json only")
    p.add_argument("--gpu-memory-utilization", type=float, default=None, help="GPU only")
    p.add_argument("--kv-cache-gib", type=float, default=1.0, help="CPU KV cache (ServerConfig.kv_cache_gib)")
    a = p.parse_args(argv)
    set_cpu_kv_cache(a.kv_cache_gib)
    uvicorn.run(build_app(a.model, a.backend, a.max_model_len, a.dtype, a.load_format,
                          a.gpu_memory_utilization), host="127.0.0.1", port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
