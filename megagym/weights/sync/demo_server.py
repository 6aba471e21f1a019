"""A minimal vLLM HTTP server with the weight-sync router mounted, for tests and `bench/refit.py`.

It stands in for the real policy server (`megagym/server/`, owned elsewhere) so that weight sync
can be tested end to end over HTTP: the engine is an `AsyncLLM` created in the app lifespan with
`engine_kwargs(backend)`, kept at `app.state.engine`, with `app.state.weight_version`, exactly the
contract `routes` documents. Two extra routes, for measuring only:
- `POST /demo/score`    `{"prompts": [[ids], ...]}` -> per-prompt `prompt_logprobs` of every
  token after the first (teacher forcing, the quantity a trainer computes);
- `POST /demo/generate` `{"prompt": [ids], "max_tokens": n}` -> greedy `token_ids`, sampled
  `logprobs`, `weight_versions` ([version, start, end] spans), `t_start`/`t_end` (time.time()).

Run: `python -m megagym.weights.sync.demo_server --model DIR --port 8123 [--backend shm]
[--dtype bfloat16 --load-format dummy]`.
Must not: grow into a second policy server (no OpenAI routes, no token-ID fix).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Body, FastAPI, Request


def build_app(model: str, backend: str = "shm", max_model_len: int = 512, dtype: str = "float32",
              load_format: str = "auto", gpu_memory_utilization: float | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from megagym.weights.sync.engine_side import engine_kwargs

        args = AsyncEngineArgs(model=model, dtype=dtype, enforce_eager=True, max_model_len=max_model_len,
                               max_num_seqs=16, load_format=load_format, **engine_kwargs(backend),
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

    @app.get("/demo/ready")
    async def ready():
        return {"ok": True}

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
                       max_tokens: int = Body(16, embed=True)):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        engine = request.app.state.engine
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=0, ignore_eos=True,
                                output_kind=RequestOutputKind.FINAL_ONLY)
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


class DemoServerProcess:
    """Runs this server in its own process group (engine children included) and talks to it."""

    def __init__(self, model: str | Path, log_path: str | Path, *, backend: str = "shm",
                 extra_args: list[str] | None = None, env: dict | None = None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "w")
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false", **(env or {}))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "megagym.weights.sync.demo_server", "--model", str(model),
             "--port", str(self.port), "--backend", backend, *(extra_args or [])],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )

    def wait_ready(self, timeout_s: float = 300.0) -> DemoServerProcess:
        import requests

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"demo server exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                if requests.get(self.url + "/demo/ready", timeout=2).ok:
                    return self
            except requests.RequestException:
                pass
            time.sleep(1)
        raise TimeoutError(f"demo server not ready in {timeout_s} s:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self, grace_s: float = 12.0) -> None:
        """SIGINT (uvicorn runs the lifespan: engine shutdown), then SIGKILL whatever is left."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        self._log.close()

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


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--backend", default="shm")
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--load-format", default="auto", help="'dummy': random weights, config.json only")
    p.add_argument("--gpu-memory-utilization", type=float, default=None, help="GPU only")
    a = p.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    uvicorn.run(build_app(a.model, a.backend, a.max_model_len, a.dtype, a.load_format,
                          a.gpu_memory_utilization), host="127.0.0.1", port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
