"""Bounded work per request: body size, JSON shape, message count and text length.

Owns: the ASGI middleware that refuses a body over `max_request_bytes` with 413 before reading it
(from Content-Length, or counted while a chunked body streams in); reading a body as JSON (only
`application/json`, no NaN/Infinity, nesting at most `MAX_JSON_DEPTH`, no lone UTF-16
surrogates — each refusal names the field); the message-count and text-length checks that run
before any rendering or tokenization; and the defaults of these limits, derived from the
engine's `max_model_len` (`ServerConfig` fields set to a number override them).
Must not: render, tokenize or touch the engine.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from typing import Any

from megagym.server.config import ServerConfig
from megagym.server.sampling import RequestError

MAX_JSON_DEPTH = 32  # tool schemas nest a few levels; nothing legitimate comes near this
TOKEN_KEYS = frozenset({"prompt_token_ids", "generation_token_ids", "generation_log_probs", "required_prefix_token_ids"})
_ESCAPED_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")
_OFF_LOOP_BYTES = 1 << 18  # parse bigger bodies in a thread: keep the event loop free


@dataclass(frozen=True)
class Limits:
    max_request_bytes: int
    max_messages: int
    max_text_chars: int
    max_model_len: int

    @classmethod
    def derive(cls, cfg: ServerConfig, max_model_len: int) -> "Limits":
        """Defaults: 1 KiB per token of context (Gym sends token fields on every assistant message,
        so a history of T turns carries ~T x context/2 ids: 150 tool-call turns at 32k are ~17 MB),
        a message costs at least 4 tokens, and text averages far fewer than 16 characters per token."""
        return cls(
            max_request_bytes=cfg.max_request_bytes or max(4 << 20, 1024 * max_model_len),
            max_messages=cfg.max_messages or max(64, max_model_len // 4),
            max_text_chars=cfg.max_text_chars or 16 * max_model_len,
            max_model_len=max_model_len,
        )


class BodyTooLarge(RequestError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"body: larger than the limit of {limit} bytes (ServerConfig.max_request_bytes)", "body", 413)


def _error_bytes(exc: RequestError) -> bytes:
    from megagym.server.protocol import error_body

    return json.dumps(error_body(str(exc), status=exc.status, param=exc.param)).encode()


class BodyLimitMiddleware:
    """Pure ASGI: 413 on a declared Content-Length over the limit (the body is never read), and a
    `BodyTooLarge` raised from `receive` once a streamed body passes it (the app answers 413)."""

    def __init__(self, app, state) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        limits: Limits | None = getattr(self.state, "limits", None)
        if scope["type"] != "http" or limits is None:
            return await self.app(scope, receive, send)
        limit = limits.max_request_bytes
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > limit
            except ValueError:
                return await _answer(send, RequestError("content-length: not an integer", "content-length"))
            if too_big:
                return await _answer(send, BodyTooLarge(limit))
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        return await self.app(scope, counted, send)


async def _answer(send, exc: RequestError) -> None:
    body = _error_bytes(exc)
    # no `connection: close`: a client still sending gets its answer; uvicorn discards the rest of
    # the body (never buffered) and connections.py closes the connection if it does not end in time
    await send({"type": "http.response.start", "status": exc.status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


# -- JSON bodies ---------------------------------------------------------------------------------


def _no_constants(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_json(raw: bytes) -> Any:
    """Bytes -> JSON value, refusing what json.loads would let through into the app."""
    try:
        value = json.loads(raw, parse_constant=_no_constants)
    except RecursionError:
        raise RequestError(f"body: JSON nested too deeply (at most {MAX_JSON_DEPTH} levels)", "body") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(f"body: invalid JSON ({e})", "body") from None
    check_json(value, surrogates=_ESCAPED_SURROGATE.search(raw) is not None)
    return value


def check_json(value: Any, *, surrogates: bool = True) -> None:
    """Depth and lone-surrogate check, naming the path of the first offence.

    Token-id / logprob lists are skipped (pydantic types them strictly as flat numbers)."""
    stack: list[tuple[Any, tuple, int]] = [(value, (), 1)]
    while stack:
        node, path, depth = stack.pop()
        if isinstance(node, str):
            if surrogates and not node.isascii():
                _check_text(node, path)
            continue
        if not isinstance(node, (dict, list)):
            continue
        if depth > MAX_JSON_DEPTH:
            top = str(path[0]) if path else "body"
            raise RequestError(f"{top}: JSON nested too deeply (at most {MAX_JSON_DEPTH} levels)", top)
        if isinstance(node, dict):
            for key, child in node.items():
                if surrogates and not key.isascii():
                    _check_text(key, path + (key,))
                if key not in TOKEN_KEYS and isinstance(child, (str, dict, list)):
                    stack.append((child, path + (key,), depth + 1))
        else:
            stack.extend((child, path + (i,), depth + 1) for i, child in enumerate(node)
                         if isinstance(child, (str, dict, list)))


def _check_text(text: str, path: tuple) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        where = _dotted(path)
        raise RequestError(f"{where}: holds a lone UTF-16 surrogate ({ascii(text[e.start])} at character {e.start}); "
                           "text must be valid Unicode", where) from None


def _dotted(path: tuple) -> str:
    # a key may itself hold the surrogate: escape it, the answer must be valid JSON
    return ".".join(str(p) for p in path).encode("utf-8", "backslashreplace").decode() or "body"


async def read_json(request, limits: Limits) -> Any:
    """The request's JSON body (415 for another content type; 413 over the size limit)."""
    kind = request.headers.get("content-type")
    if kind is not None:
        media = kind.split(";", 1)[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):
            raise RequestError(f"content-type: {media!r} is not accepted; send application/json", "content-type", 415)
    raw = await request.body()
    if len(raw) > limits.max_request_bytes:  # a body without Content-Length that stayed in one chunk
        raise BodyTooLarge(limits.max_request_bytes)
    if len(raw) > _OFF_LOOP_BYTES:
        return await asyncio.to_thread(parse_json, raw)
    return parse_json(raw)


# -- chat requests -------------------------------------------------------------------------------


def text_chars(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(text_chars(part.get("text") if isinstance(part, dict) else part) for part in content)
    return 0


def check_chat(req, limits: Limits) -> None:
    """Message count, total text and token-field lengths, before anything is rendered."""
    n = len(req.messages)
    if n > limits.max_messages:
        raise RequestError(f"messages: {n} messages exceed the limit of {limits.max_messages} "
                           "(ServerConfig.max_messages)", "messages")
    total = len(json.dumps(req.tool_dicts())) if req.tools else 0
    for i, m in enumerate(req.messages):
        total += text_chars(m.content) + len(m.reasoning_content or "") + len(m.reasoning or "")
        for call in m.tool_calls or ():
            args = call.function.arguments
            total += len(call.function.name) + (len(args) if isinstance(args, str) else len(json.dumps(args)))
        for field in ("prompt_token_ids", "generation_token_ids", "generation_log_probs"):
            ids = getattr(m, field)
            if ids is not None and len(ids) > limits.max_model_len:
                raise RequestError(f"messages[{i}].{field}: {len(ids)} entries, more than the context length "
                                   f"{limits.max_model_len}", f"messages.{i}.{field}")
    need = req.required_prefix_token_ids
    if need is not None and len(need) > limits.max_model_len:
        raise RequestError(f"required_prefix_token_ids: {len(need)} ids, more than the context length "
                           f"{limits.max_model_len}", "required_prefix_token_ids")
    check_text_total(total, "messages", limits)


def check_text_total(total: int, field: str, limits: Limits) -> None:
    if total > limits.max_text_chars:
        raise RequestError(f"{field}: {total} characters of text exceed the limit of {limits.max_text_chars} "
                           "(ServerConfig.max_text_chars)", field)
