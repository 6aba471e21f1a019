"""The policy server's FastAPI app: OpenAI-compatible chat completions with exact token information.

Owns: the HTTP surface — `POST /v1/chat/completions`, `POST /tokenize`, `GET /v1/models`,
`GET /health`, `POST /megagym/token_versions` — request → prompt ids (tokens.py, off the event
loop) → sampling guard (sampling.py) → engine (engine.py) → OpenAI-schema response with
`prompt_token_ids`, `generation_token_ids`, `generation_log_probs` and
`generation_weight_versions` (which weight version produced each token, as boundaries
`[[start_index, version], ...]`, megagym.token_versions) on each choice's message, tool calls and
reasoning parsed by vLLM's own parsers, and the weight version when the answer finished on every
response (body field `weight_version` and header `x-weight-version`).
Gym's model proxy drops every non-token field, so each returned choice's boundaries are also kept
in a bounded `TokenVersionLedger` (`app.state.token_versions`) under
`generation_key(prompt_token_ids, generation_token_ids)`; `POST /megagym/token_versions`
`{"keys": [hex, ...]}` answers `{"versions": [boundaries | null, ...]}` aligned to the keys, each
record read once. With `request_seeds` on, a request without a `seed` is sampled under one derived
from the server's seed, weight version and prompt (request_seeds.py: repeatable runs). `/health`
also reports `requests_in_flight` (generation requests in the engine now) and `idle_seconds` (wall
seconds since start with none in flight, counted up to now). Every refusal is a 4xx naming the
field, and the order of checks keeps the work of a refused request small: body size (limits.py, before the
body is read) -> JSON shape -> typed fields (protocol.py) -> message count and text length
(limits.py) -> sampling guard -> rendering and the token fix -> engine.
Must not: hold engine or weight-update logic (engine.py), implement the token fix (tokens.py),
or the request limits (limits.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import time
import uuid
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any, Awaitable, Callable

import pydantic_core
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.requests import ClientDisconnect

from megagym.server.config import ServerConfig
from megagym.server.limits import BodyLimitMiddleware, Limits, check_chat, check_text_total, read_json
from megagym.server.protocol import (
    ChatCompletionRequest,
    TokenizeChatRequest,
    TokenizeTextRequest,
    describe_validation_errors,
    error_body,
)
from megagym.server.request_seeds import RequestSeeds
from megagym.server.sampling import RequestError, check_sampling, max_new_tokens
from megagym.server.tokens import ChatTokenizer, TokenFixError
from megagym.token_versions import TokenVersionLedger, generation_key

log = logging.getLogger("megagym.server")
LOGPROB_FLOOR = -9999.0  # JSON has no -inf; vLLM uses the same floor
MAX_VERSION_KEYS = 4096  # keys per /megagym/token_versions request
_HEX = frozenset("0123456789abcdef")


def json_response(body: Any, status: int = 200, weight_version: int | None = None) -> Response:
    headers = {"x-weight-version": str(weight_version)} if weight_version is not None else None
    return Response(pydantic_core.to_json(body), status_code=status, media_type="application/json", headers=headers)


def error_response(message: str, status: int = 400, param: str | None = None) -> Response:
    return json_response(error_body(message, status=status, param=param), status)


class ClientGone(Exception):
    pass


class Occupancy:
    """Generation requests in flight now, and the wall seconds spent with none in flight."""

    def __init__(self) -> None:
        self.in_flight = 0
        self._idle = 0.0
        self._idle_since = time.monotonic()

    def enter(self) -> None:
        if self.in_flight == 0:
            self._idle += time.monotonic() - self._idle_since
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle_since = time.monotonic()

    def idle_seconds(self) -> float:
        return self._idle + (time.monotonic() - self._idle_since if self.in_flight == 0 else 0.0)


class Parsers:
    """vLLM's tool-call and reasoning parsers, built once (reasoning: once per template kwargs)."""

    def __init__(self, cfg: ServerConfig, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.tool = None
        self.reasoning_name = cfg.reasoning_parser
        self._reasoning: dict[str, Any] = {}
        if cfg.tool_parser:
            from vllm.tool_parsers import ToolParserManager

            self.tool = ToolParserManager.get_tool_parser(cfg.tool_parser)(tokenizer)
        if cfg.reasoning_parser:
            self.reasoning_for({})  # fail at start-up on a bad name, not on the first request

    def reasoning_for(self, template_kwargs: dict) -> Any:
        key = repr(sorted(template_kwargs.items()))
        parser = self._reasoning.get(key)
        if parser is None:
            from vllm.reasoning import ReasoningParserManager

            cls = ReasoningParserManager.get_reasoning_parser(self.reasoning_name)
            parser = cls(self.tokenizer, chat_template_kwargs=dict(template_kwargs))
            if len(self._reasoning) < 16:  # bounded: kwargs come from requests
                self._reasoning[key] = parser
        return parser


async def _wait_disconnect(raw: Request) -> None:
    while True:
        message = await raw.receive()
        if message["type"] == "http.disconnect":
            return


async def _unless_disconnected(raw: Request, work: Awaitable[Any], on_gone: Callable[[], Awaitable[None]]) -> Any:
    """Run `work`; if the client disconnects first, cancel it (which aborts the engine request)."""
    task = asyncio.ensure_future(work)
    listener = asyncio.ensure_future(_wait_disconnect(raw))
    try:
        done, _ = await asyncio.wait({task, listener}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        await on_gone()
        raise
    finally:
        listener.cancel()
    if task in done:
        return task.result()
    task.cancel()
    await on_gone()
    raise ClientGone()


def create_app(cfg: ServerConfig, *, engine_factory: Callable[[ServerConfig], Awaitable[Any]] | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from transformers import AutoTokenizer

        from megagym.server import engine as eng

        llm = await (engine_factory or eng.start_engine)(cfg)
        try:
            tok = await asyncio.to_thread(AutoTokenizer.from_pretrained, cfg.model)
            stop_ids = _as_list(getattr(llm.model_config.hf_config, "eos_token_id", None))
            stop_ids += _generation_eos(cfg.model)
            st = app.state
            st.engine = llm  # the AsyncLLM itself (weight sync drives it directly)
            st.weight_version = cfg.initial_weight_version
            st.max_model_len = int(llm.model_config.max_model_len)
            st.vocab_size = int(llm.model_config.get_vocab_size())
            st.dtype = str(getattr(llm.model_config, "dtype", cfg.dtype)).removeprefix("torch.")
            st.chat = ChatTokenizer(tok, default_template_kwargs=cfg.chat_template_kwargs, stop_ids=stop_ids,
                                    vocab_size=st.vocab_size)
            st.parsers = Parsers(cfg, tok)
            st.started = time.time()
            st.occupancy = Occupancy()  # idle time counts from here
            st.limits = Limits.derive(cfg, st.max_model_len)
            log.info("policy server ready: model=%s dtype=%s max_model_len=%d limits=%s", cfg.model_name,
                     st.dtype, st.max_model_len, st.limits)
            yield
        finally:
            eng.shutdown(llm, cfg)

    app = FastAPI(title="megagym policy server", lifespan=lifespan)
    app.state.cfg = cfg
    app.state.token_versions = TokenVersionLedger()
    app.state.request_seeds = RequestSeeds(cfg.seed) if cfg.request_seeds else None
    app.add_middleware(BodyLimitMiddleware, state=app.state)

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if cfg.api_key and request.url.path != "/health":
            header = request.headers.get("authorization", "")
            if not secrets.compare_digest(header.encode(), f"Bearer {cfg.api_key}".encode()):
                return error_response("authorization: missing or wrong bearer API key", 401, "authorization")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def on_validation(_: Request, exc: RequestValidationError):
        message, param = describe_validation_errors(exc.errors())
        return error_response(message, 400, param)

    @app.exception_handler(RequestError)
    async def on_request_error(request: Request, exc: RequestError):
        log.warning("%s %s -> %d: %.300s", request.method, request.url.path, exc.status, exc)
        return error_response(str(exc), exc.status, exc.param)

    @app.exception_handler(TokenFixError)
    async def on_token_error(request: Request, exc: TokenFixError):
        log.warning("%s %s -> 400: %.300s", request.method, request.url.path, exc)
        return error_response(str(exc), 400, "messages")

    @app.get("/health")
    async def health(request: Request):
        from megagym.server.engine import updating

        st = request.app.state
        ok = not st.engine.errored
        body = {"status": "ok" if ok else "engine dead", "weight_version": st.weight_version,
                "updating_weights": updating(st), "model": cfg.model_name, "dtype": st.dtype,
                "limits": dataclasses.asdict(st.limits), "requests_in_flight": st.occupancy.in_flight,
                "idle_seconds": round(st.occupancy.idle_seconds(), 6)}
        return json_response(body, 200 if ok else 503, st.weight_version)

    @app.get("/v1/models")
    async def models(request: Request):
        st = request.app.state
        card = {"id": cfg.model_name, "object": "model", "created": int(st.started),
                "owned_by": "megagym", "root": cfg.model, "max_model_len": st.max_model_len}
        return json_response({"object": "list", "data": [card]}, 200, st.weight_version)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        st = request.app.state
        body = await read_json(request, st.limits)
        chat: ChatTokenizer = st.chat
        if isinstance(body, dict) and "prompt" in body and "messages" not in body:
            req = _parse(TokenizeTextRequest, body)
            check_text_total(len(req.prompt), "prompt", st.limits)
            ids = await asyncio.to_thread(
                lambda: list(chat.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens))
            )
        else:
            req = _parse(TokenizeChatRequest, body)
            check_chat(req, st.limits)
            prompt = await asyncio.to_thread(_prompt_ids, chat, req, cfg)
            ids = prompt.token_ids
        max_len = request.app.state.max_model_len
        return json_response({"count": len(ids), "max_model_len": max_len, "tokens": ids, "token_strs": None})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        from megagym.server import engine as eng

        st = request.app.state
        req = _parse(ChatCompletionRequest, await read_json(request, st.limits))
        if req.model is not None and req.model not in (cfg.model_name, cfg.model):
            raise RequestError(f"model: {req.model!r} is not served here; this server serves {cfg.model_name!r}", "model")
        check_chat(req, st.limits)
        sampling = check_sampling(req, cfg)
        sampling.setdefault("logprobs", 0)  # token information is always computed (one log-softmax per step)
        prompt = await asyncio.to_thread(_prompt_ids, st.chat, req, cfg)
        ids = prompt.token_ids
        if st.request_seeds is not None and sampling["seed"] is None:
            sampling["seed"] = st.request_seeds.derive(ids, st.weight_version)
        max_tokens = max_new_tokens(req, len(ids), st.max_model_len)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        llm = st.engine
        st.occupancy.enter()
        try:
            final = await _unless_disconnected(
                request, eng.generate(llm, ids, sampling, max_tokens, request_id), lambda: eng.abort(llm, request_id)
            )
        except ClientGone:
            return error_response("client disconnected", 499)
        except Exception as e:
            if llm.errored:
                return error_response(f"engine is dead: {e}", 503)
            refused = _engine_refusal(e)
            if refused is not None:
                raise refused from None
            raise
        finally:
            st.occupancy.leave()
        body = _chat_response(req, final, ids, request_id, st, cfg)
        ledger: TokenVersionLedger = st.token_versions
        for choice in body["choices"]:
            message = choice["message"]
            ledger.record(generation_key(ids, message["generation_token_ids"]), message["generation_weight_versions"])
        return json_response(body, 200, st.weight_version)

    @app.post("/megagym/token_versions")
    async def token_versions(request: Request):
        st = request.app.state
        keys = _version_keys(await read_json(request, st.limits))
        ledger: TokenVersionLedger = st.token_versions
        return json_response({"versions": ledger.take(keys)}, 200, st.weight_version)

    if cfg.weight_sync:
        from megagym.weights.sync.routes import router

        app.include_router(router)

    @app.exception_handler(ClientDisconnect)
    async def on_disconnect(_: Request, exc: ClientDisconnect):
        return error_response("client disconnected", 499)

    @app.exception_handler(Exception)
    async def on_unexpected(_: Request, exc: Exception):
        log.exception("unexpected error")
        return error_response(f"internal error: {type(exc).__name__}: {exc}", 500)

    for target in cfg.extensions:
        _load_extension(str(target))(app)
    return app


def _load_extension(target: str) -> Callable[[FastAPI], Any]:
    import importlib

    module_name, _, func_name = target.partition(":")
    if not func_name:
        raise ValueError(f"extensions: {target!r} must look like 'package.module:function'")
    return getattr(importlib.import_module(module_name), func_name)


# -- helpers -----------------------------------------------------------------------------------


def _engine_refusal(exc: Exception) -> RequestError | None:
    """vLLM's verdict on a request it refuses (its client errors, ValueError) -> a 400 naming the field."""
    from vllm.exceptions import VLLMClientError

    if isinstance(exc, VLLMClientError):
        param = getattr(exc, "parameter", None) or "messages"
        return RequestError(f"{param}: the engine refused the request: {exc}", param)
    if isinstance(exc, (ValueError, OverflowError)):
        return RequestError(f"messages: the engine refused the request: {exc}", "messages")
    return None


def _version_keys(body: Any) -> list[str]:
    """The `keys` of a /megagym/token_versions body, read strictly (400 naming the field)."""
    if not isinstance(body, dict):
        raise RequestError("body: expected a JSON object {\"keys\": [...]}", "body")
    for name in body:
        if name != "keys":
            raise RequestError(f"{name}: not a field of /megagym/token_versions (accepted: keys)", str(name))
    keys = body.get("keys")
    if not isinstance(keys, list):
        raise RequestError(f"keys: required, a list of generation keys (got {type(keys).__name__})", "keys")
    if len(keys) > MAX_VERSION_KEYS:
        raise RequestError(f"keys: at most {MAX_VERSION_KEYS} keys per request, got {len(keys)}", "keys", 413)
    for i, key in enumerate(keys):
        if not (isinstance(key, str) and len(key) == 64 and set(key) <= _HEX):
            raise RequestError(f"keys[{i}]: expected a generation key (64 lowercase hex characters, "
                               "megagym.token_versions.generation_key)", "keys")
    return keys


def _parse(model: type, body: Any):
    if not isinstance(body, dict):
        raise RequestError("body: expected a JSON object", "body")
    try:
        return model.model_validate(body)
    except pydantic_core.ValidationError as e:
        message, param = describe_validation_errors(e.errors(), model)
        raise RequestError(message, param) from None


def _prompt_ids(chat: ChatTokenizer, req, cfg: ServerConfig):
    messages = [m.template_dict() for m in req.messages]
    kwargs = {**cfg.chat_template_kwargs, **(req.chat_template_kwargs or {})}
    prompt = chat.prompt_ids(messages, tools=req.tool_dicts(), template_kwargs=kwargs,
                             add_generation_prompt=req.add_generation_prompt)
    need = req.required_prefix_token_ids
    if need and prompt.token_ids[: len(need)] != need:
        raise RequestError(
            f"required_prefix_token_ids: the prompt built from the messages (and their token fields) does not start "
            f"with these {len(need)} ids", "required_prefix_token_ids")
    return prompt


def _as_list(x: Any) -> list[int]:
    return [int(v) for v in (x if isinstance(x, (list, tuple)) else [x]) if v is not None]


def _generation_eos(model_dir: str) -> list[int]:
    import json
    from pathlib import Path

    path = Path(model_dir) / "generation_config.json"
    try:
        return _as_list(json.loads(path.read_text()).get("eos_token_id"))
    except (OSError, ValueError):
        return []


def _logprob_entry(token_id: int, lp: Any, as_ids: bool) -> dict:
    text = lp.decoded_token if lp.decoded_token is not None else ""
    return {
        "token": f"token_id:{token_id}" if as_ids else text,
        "logprob": max(float(lp.logprob), LOGPROB_FLOOR),
        "bytes": list(text.encode("utf-8", errors="replace")),
    }


def _choice(req: ChatCompletionRequest, out: Any, prompt_ids: list[int], state: Any, cfg: ServerConfig) -> dict:
    from megagym.server.engine import token_boundaries

    parsers: Parsers = state.parsers
    gen_ids = list(out.token_ids)
    steps = out.logprobs or []
    gen_logps = [max(float(steps[i][t].logprob), LOGPROB_FLOOR) for i, t in enumerate(gen_ids)] if steps else []
    text = out.text
    shim = SimpleNamespace(
        messages=req.messages, tools=req.tool_dicts(), tool_choice=req.tool_choice,
        chat_template_kwargs={**cfg.chat_template_kwargs, **(req.chat_template_kwargs or {})},
        skip_special_tokens=True, include_reasoning=True,
    )
    reasoning, content = None, text
    if parsers.reasoning_name:
        reasoning, content = parsers.reasoning_for(shim.chat_template_kwargs).extract_reasoning(text, shim)
    tool_calls: list[dict] = []
    if parsers.tool is not None and req.tools and req.tool_choice != "none" and content:
        info = parsers.tool.extract_tool_calls(content, shim)
        if info.tools_called:
            content = info.content
            for call in info.tool_calls[: 1 if req.parallel_tool_calls is False else None]:
                tool_calls.append({
                    "id": getattr(call, "id", None) or f"call_{uuid.uuid4().hex[:24]}",
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": call.function.arguments},
                })
    finish = out.finish_reason or "stop"
    stop_reason = out.stop_reason
    if finish not in ("stop", "length"):  # "abort" (paused with mode=abort): not an OpenAI value
        finish, stop_reason = "length", finish
    if tool_calls and finish == "stop":
        finish = "tool_calls"
    message: dict[str, Any] = {"role": "assistant", "content": content, "tool_calls": tool_calls}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
        message["reasoning"] = reasoning
    message["prompt_token_ids"] = prompt_ids
    message["generation_token_ids"] = gen_ids
    message["generation_log_probs"] = gen_logps
    message["generation_weight_versions"] = token_boundaries(out, state.weight_version)
    choice: dict[str, Any] = {"index": out.index, "message": message, "finish_reason": finish, "logprobs": None,
                              "stop_reason": stop_reason}
    if req.logprobs:
        as_ids = bool(req.return_tokens_as_token_ids)
        top_n = int(req.top_logprobs or 0)
        content_lps = []
        for i, t in enumerate(gen_ids):
            entry = _logprob_entry(t, steps[i][t], as_ids)
            ranked = sorted(((tid, lp) for tid, lp in steps[i].items() if lp.rank is not None and lp.rank <= top_n),
                            key=lambda x: x[1].rank)
            entry["top_logprobs"] = [_logprob_entry(tid, lp, as_ids) for tid, lp in ranked[:top_n]]
            content_lps.append(entry)
        choice["logprobs"] = {"content": content_lps}
    return choice


def _chat_response(req: ChatCompletionRequest, final: Any, prompt_ids: list[int], request_id: str, state: Any,
                   cfg: ServerConfig) -> dict:
    choices = [_choice(req, out, prompt_ids, state, cfg) for out in final.outputs]
    completion = sum(len(c["message"]["generation_token_ids"]) for c in choices)
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": cfg.model_name,
        "choices": choices,
        "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": completion,
                  "total_tokens": len(prompt_ids) + completion},
        "weight_version": state.weight_version,
    }
