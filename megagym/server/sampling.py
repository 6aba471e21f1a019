"""The sampling guard: only the training or validation sampling settings reach the engine.

Owns: checking a chat request's sampling fields against `ServerConfig` and producing the keyword
arguments of vLLM's `SamplingParams`. Off-policy sampling is a silent training bug, so anything
that changes the sampling distribution away from the configured pairs is refused with a
`RequestError` naming the field (HTTP 400): temperature/top_p outside the allowed pairs, top_k,
min_p, penalties, logit_bias, min_tokens, ignore_eos, structured output (`response_format` other
than text), and the output-shaping fields the server does not honour (`continue_final_message`,
`echo`, `include_stop_str_in_output`, `skip_special_tokens=false`, `stream_options`). Fields the
server does not know at all never get here (protocol.py refuses them by name). Stop strings must
be non-empty and bounded. Unset temperature/top_p take the training values (never the model's
generation_config defaults, which vLLM would otherwise apply).
Must not: import vLLM (the engine module builds `SamplingParams` from the returned dict).
"""

from __future__ import annotations

import math

from megagym.server.config import ServerConfig
from megagym.server.protocol import ChatCompletionRequest


class RequestError(ValueError):
    """A request the server refuses; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param = param
        self.status = status


MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
_NEUTRAL = {"min_p": 0.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0, "min_tokens": 0}


def _same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=0.0, abs_tol=1e-9)


def check_sampling(req: ChatCompletionRequest, cfg: ServerConfig) -> dict:
    """Validate the request's sampling fields; return SamplingParams kwargs (without max_tokens)."""
    if req.stream:
        raise RequestError("stream: streaming is not supported by this server; send stream=false", "stream")
    if req.top_k is not None and req.top_k not in (-1, 0):
        raise RequestError(f"top_k: must be unset or -1 (got {req.top_k}); top-k sampling is off-policy", "top_k")
    for name, neutral in _NEUTRAL.items():
        value = getattr(req, name)
        if value is not None and not _same(float(value), neutral):
            raise RequestError(f"{name}: must be unset or {neutral} (got {value}); it would sample off-policy", name)
    if req.logit_bias:
        raise RequestError("logit_bias: not allowed; it would sample off-policy", "logit_bias")
    if req.ignore_eos:
        raise RequestError("ignore_eos: not allowed; it would sample off-policy", "ignore_eos")
    if req.response_format is not None and req.response_format != {"type": "text"}:
        raise RequestError("response_format: only {\"type\": \"text\"} is accepted; structured output "
                           "(guided decoding) samples from another distribution than the trainer recomputes",
                           "response_format")
    for name, honoured in (("continue_final_message", False), ("echo", False), ("include_stop_str_in_output", False),
                           ("skip_special_tokens", True)):
        value = getattr(req, name)
        if value is not None and value != honoured:
            raise RequestError(f"{name}: only {str(honoured).lower()} (or unset) is supported by this server", name)
    if req.stream_options is not None:
        raise RequestError("stream_options: streaming is not supported by this server", "stream_options")
    if req.n > 1 and req.wants_token_info:
        raise RequestError(
            f"n: must be 1 when token information is requested (logprobs / return_tokens_as_token_ids), got {req.n}",
            "n",
        )
    if req.tool_choice not in (None, "auto", "none"):
        raise RequestError(
            "tool_choice: only 'auto' and 'none' are supported (forced tool calls need guided decoding, "
            "which would change the sampling distribution)",
            "tool_choice",
        )
    if req.top_logprobs and req.top_logprobs > 0 and not req.logprobs:
        raise RequestError("top_logprobs: requires logprobs=true", "top_logprobs")

    temperature = cfg.train_sampling.temperature if req.temperature is None else float(req.temperature)
    top_p = cfg.train_sampling.top_p if req.top_p is None else float(req.top_p)
    allowed = cfg.allowed_sampling()
    if not any(_same(temperature, t) and _same(top_p, p) for t, p in allowed):
        field = "temperature" if not any(_same(temperature, t) for t, _ in allowed) else "top_p"
        pairs = ", ".join(f"(temperature={t}, top_p={p})" for t, p in dict.fromkeys(allowed))
        raise RequestError(
            f"{field}: request sampling (temperature={temperature}, top_p={top_p}) matches neither the training "
            f"nor the validation setting of this server: {pairs}",
            field,
        )

    stop = check_stop(req.stop)
    kwargs = dict(temperature=temperature, top_p=top_p, top_k=-1, n=req.n, seed=req.seed, stop=stop or None)
    if req.wants_token_info or req.logprobs:
        kwargs["logprobs"] = max(int(req.top_logprobs or 0), 0)
    return kwargs


def check_stop(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise RequestError(f"stop: at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}", "stop")
    for i, s in enumerate(stops):
        if not s:
            raise RequestError(f"stop[{i}]: an empty stop string would end every generation at once", "stop")
        if len(s) > MAX_STOP_CHARS:
            raise RequestError(f"stop[{i}]: longer than {MAX_STOP_CHARS} characters", "stop")
    return stops


def max_new_tokens(req: ChatCompletionRequest, prompt_len: int, max_model_len: int) -> int:
    """Requested output budget clamped to the context that is left; 400 if nothing is left."""
    if prompt_len >= max_model_len:
        raise RequestError(
            f"This model's maximum context length is {max_model_len} tokens. However, your prompt has "
            f"{prompt_len} tokens, which leaves no room for output. Please reduce the length of the messages.",
            "messages",
        )
    room = max_model_len - prompt_len
    wanted = req.max_completion_tokens or req.max_tokens
    return room if wanted is None else min(int(wanted), room)
