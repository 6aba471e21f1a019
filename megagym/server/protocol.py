"""Request and response shapes of the policy server (the OpenAI chat schema plus vLLM's extras).

Owns: pydantic models for `/v1/chat/completions` and `/tokenize` requests, the list of request
fields the server accepts, the OpenAI-style error body, and turning validation errors into a 400
that names the field. A request field the server does not know is refused by name: every field
is either honoured, refused unless it holds its neutral value (sampling.py), or accepted as
bookkeeping that cannot change what is sampled (`metadata`, `user`, `store`, ...).
Token fields are typed strictly here (integers, finite numbers); their meaning is checked in
tokens.py.
Must not: import vLLM or know about the engine; sampling policy lives in `sampling.py`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (
    BaseModel, ConfigDict, Field, PrivateAttr, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator,
    model_validator,
)

Number = Union[StrictInt, Annotated[StrictFloat, Field(allow_inf_nan=False)]]
TokenIds = list[StrictInt]
INT64 = (-(2**63), 2**63 - 1)


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: StrictStr = Field(min_length=1, max_length=256)
    description: Optional[StrictStr] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[StrictBool] = None


class ToolSpec(BaseModel):
    """A tool definition; anything but a well-formed function tool is refused before rendering."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionSpec


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: StrictStr = Field(min_length=1, max_length=256)
    arguments: Union[StrictStr, dict[str, Any]] = ""


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="allow")  # clients add `index`; the template ignores extras

    id: Optional[StrictStr] = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[StrictStr, list[Any], None] = None
    name: Optional[StrictStr] = None
    tool_calls: Optional[list[ToolCall]] = None
    tool_call_id: Optional[StrictStr] = None
    reasoning_content: Optional[StrictStr] = None
    reasoning: Optional[StrictStr] = None
    # token fields of an earlier model call (Gym's training contract); checked in tokens.py.
    # prompt_token_ids is typed there, only on the message that is used: Gym sends it on every
    # assistant message, turns x context ids in all, too many to type-check on each call.
    prompt_token_ids: Optional[list[Any]] = None
    generation_token_ids: Optional[TokenIds] = None
    generation_log_probs: Optional[list[Number]] = None

    def template_dict(self) -> dict[str, Any]:
        # shallow on purpose: token-id lists are referenced, not copied (histories can be 32k ids)
        d = {k: v for k, v in self.__dict__.items() if v is not None}
        if self.tool_calls is not None:
            d["tool_calls"] = [c.model_dump(exclude_none=True) for c in self.tool_calls]
        if self.__pydantic_extra__:
            d.update((k, v) for k, v in self.__pydantic_extra__.items() if v is not None)
        if d.get("role") == "developer":
            d["role"] = "system"
        # vLLM >= 0.16 spells it `reasoning`; templates (Qwen3) read `reasoning_content`
        if "reasoning_content" not in d and "reasoning" in d:
            d["reasoning_content"] = d["reasoning"]
        d.pop("reasoning", None)
        return d


# chat_template_kwargs are template variables only: these names belong to apply_chat_template
RESERVED_TEMPLATE_KWARGS = frozenset({
    "messages", "conversation", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
    "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs", "bos_token", "eos_token",
    "pad_token", "unk_token", "raise_exception", "strftime_now",
})
TemplateValue = Union[StrictBool, StrictInt, StrictStr, None, Annotated[StrictFloat, Field(allow_inf_nan=False)]]


class _ChatBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    messages: list[ChatMessage] = Field(min_length=1)
    model: Optional[StrictStr] = None
    tools: Optional[list[ToolSpec]] = None
    chat_template_kwargs: Optional[dict[str, TemplateValue]] = None
    add_generation_prompt: StrictBool = True
    # Gym's optional prefix-supply extension: the prompt must start with these ids (checked, 400 if not)
    required_prefix_token_ids: Optional[TokenIds] = None
    # the tool dicts exactly as the client sent them (after `tools` validated): the template renders
    # them as JSON, so key order and explicit nulls change the prompt; Gym sends {"function", "type"}
    _client_tools: Optional[list[dict]] = PrivateAttr(default=None)

    @model_validator(mode="wrap")
    @classmethod
    def _keep_client_tools(cls, data: Any, handler):
        model = handler(data)
        if isinstance(data, dict) and model.tools:
            model._client_tools = data["tools"]
        return model

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_variables_only(cls, value: dict | None) -> dict | None:
        for key in value or {}:
            if key in RESERVED_TEMPLATE_KWARGS or not key.isidentifier():
                raise ValueError(f"{key!r} is not a template variable this server passes on")
        return value

    def tool_dicts(self) -> list[dict] | None:
        """The validated tools as the client wrote them (its key order, its explicit nulls)."""
        if not self.tools:
            return None
        return self._client_tools or [t.model_dump(exclude_none=True) for t in self.tools]


class ChatCompletionRequest(_ChatBase):
    tool_choice: Union[Literal["none", "auto", "required"], dict[str, Any], None] = None
    parallel_tool_calls: Optional[StrictBool] = None  # false: only the first parsed tool call is returned
    temperature: Optional[Number] = None
    top_p: Optional[Number] = None
    max_tokens: Optional[StrictInt] = Field(default=None, ge=1)
    max_completion_tokens: Optional[StrictInt] = Field(default=None, ge=1)
    n: StrictInt = Field(default=1, ge=1, le=64)
    logprobs: Optional[StrictBool] = None
    top_logprobs: Optional[StrictInt] = Field(default=None, ge=0, le=20)
    return_tokens_as_token_ids: Optional[StrictBool] = None
    return_token_ids: Optional[StrictBool] = None  # token ids are always returned
    stop: Union[StrictStr, list[StrictStr], None] = None
    seed: Optional[StrictInt] = Field(default=None, ge=INT64[0], le=INT64[1])
    stream: Optional[StrictBool] = False
    # bookkeeping: accepted, cannot change what is sampled, otherwise ignored
    metadata: Optional[dict[str, Any]] = None
    user: Optional[StrictStr] = None
    store: Optional[StrictBool] = None
    service_tier: Optional[StrictStr] = None
    prompt_cache_key: Optional[StrictStr] = None
    prompt_cache_retention: Optional[StrictStr] = None
    safety_identifier: Optional[StrictStr] = None
    # only their neutral value is accepted (sampling.py refuses anything else, naming the field)
    top_k: Optional[StrictInt] = None
    min_p: Optional[Number] = None
    presence_penalty: Optional[Number] = None
    frequency_penalty: Optional[Number] = None
    repetition_penalty: Optional[Number] = None
    min_tokens: Optional[StrictInt] = None
    logit_bias: Optional[dict[str, Any]] = None
    ignore_eos: Optional[StrictBool] = None
    response_format: Optional[dict[str, Any]] = None
    stream_options: Optional[Any] = None
    continue_final_message: Optional[StrictBool] = None
    skip_special_tokens: Optional[StrictBool] = None
    include_stop_str_in_output: Optional[StrictBool] = None
    echo: Optional[StrictBool] = None

    @property
    def wants_token_info(self) -> bool:
        return bool(self.logprobs) or bool(self.return_tokens_as_token_ids)


class TokenizeChatRequest(_ChatBase):
    add_generation_prompt: StrictBool = True


class TokenizeTextRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: StrictStr
    model: Optional[StrictStr] = None
    add_special_tokens: StrictBool = True


def accepted_fields(model: type[BaseModel]) -> list[str]:
    return sorted(model.model_fields)


def error_body(message: str, *, status: int = 400, param: str | None = None, kind: str | None = None) -> dict:
    """OpenAI-style error (vLLM's shape); `message` always names the cause."""
    kind = kind or ("invalid_request_error" if status < 500 else "internal_error")
    message, param = _valid_text(message), None if param is None else _valid_text(param)
    return {"object": "error", "error": {"message": message, "type": kind, "param": param, "code": status}}


def _valid_text(text: str) -> str:
    """Text that encodes as UTF-8: a message may quote a client's lone surrogate."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


# pydantic puts union members and constrained types into `loc`; they are not field names
_SCALAR_TAGS = frozenset({"str", "int", "float", "bool", "none"})


def _is_type_tag(part: str) -> bool:
    return part in _SCALAR_TAGS or "[" in part or part.startswith("constrained-")


def describe_validation_errors(errors: list[dict], model: type[BaseModel] | None = None) -> tuple[str, str | None]:
    """pydantic / FastAPI errors -> ("field.path: reason; ...", first field path)."""
    parts, first = [], None
    for err in errors[:5]:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        loc = [x for x in loc if not _is_type_tag(x)]
        path = ".".join(loc) or "body"
        kind = err.get("type")
        if kind == "json_invalid":
            path = "body"
            msg = f"invalid JSON ({err.get('ctx', {}).get('error', 'decode error')})"
        elif kind == "extra_forbidden":
            msg = "not supported by this server"
            if model is not None and len(loc) == 1:
                msg += f" (accepted fields: {', '.join(accepted_fields(model))})"
        else:
            msg = err.get("msg", "invalid")
        first = first or path
        parts.append(f"{path}: {msg}")
    return "; ".join(dict.fromkeys(parts)), first
