"""Request and response shapes of the policy server (the OpenAI chat schema plus vLLM's extras).

Owns: pydantic models for `/v1/chat/completions` and `/tokenize` requests, the OpenAI-style error
body, and turning validation errors into a 400 that names the field. Unknown request fields are
accepted and ignored (Gym and the OpenAI client send `metadata`, `store`, `parallel_tool_calls`,
...), but every known field is type-checked.
Must not: import vLLM or know about the engine; sampling policy lives in `sampling.py`.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

Number = Union[StrictInt, StrictFloat]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[StrictStr, list[Any], None] = None
    name: Optional[StrictStr] = None
    tool_calls: Optional[list[dict[str, Any]]] = None
    tool_call_id: Optional[StrictStr] = None
    reasoning_content: Optional[StrictStr] = None
    reasoning: Optional[StrictStr] = None
    # token fields of an earlier model call (Gym's training contract); checked in tokens.py
    prompt_token_ids: Optional[list[Any]] = None
    generation_token_ids: Optional[list[Any]] = None
    generation_log_probs: Optional[list[Any]] = None

    def template_dict(self) -> dict[str, Any]:
        # shallow on purpose: token-id lists are referenced, not copied (histories can be 32k ids)
        d = {k: v for k, v in self.__dict__.items() if v is not None}
        if self.__pydantic_extra__:
            d.update((k, v) for k, v in self.__pydantic_extra__.items() if v is not None)
        if d.get("role") == "developer":
            d["role"] = "system"
        # vLLM >= 0.16 spells it `reasoning`; templates (Qwen3) read `reasoning_content`
        if "reasoning_content" not in d and "reasoning" in d:
            d["reasoning_content"] = d["reasoning"]
        d.pop("reasoning", None)
        return d


class _ChatBase(BaseModel):
    model_config = ConfigDict(extra="allow")

    messages: list[ChatMessage] = Field(min_length=1)
    model: Optional[StrictStr] = None
    tools: Optional[list[dict[str, Any]]] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None
    add_generation_prompt: StrictBool = True
    # Gym's optional prefix-supply extension: the prompt must start with these ids (checked, 400 if not)
    required_prefix_token_ids: Optional[list[StrictInt]] = None


class ChatCompletionRequest(_ChatBase):
    tool_choice: Union[Literal["none", "auto", "required"], dict[str, Any], None] = None
    temperature: Optional[Number] = None
    top_p: Optional[Number] = None
    top_k: Optional[StrictInt] = None
    min_p: Optional[Number] = None
    presence_penalty: Optional[Number] = None
    frequency_penalty: Optional[Number] = None
    repetition_penalty: Optional[Number] = None
    logit_bias: Optional[dict[str, Any]] = None
    min_tokens: Optional[StrictInt] = None
    max_tokens: Optional[StrictInt] = Field(default=None, ge=1)
    max_completion_tokens: Optional[StrictInt] = Field(default=None, ge=1)
    n: StrictInt = Field(default=1, ge=1, le=64)
    logprobs: Optional[StrictBool] = None
    top_logprobs: Optional[StrictInt] = Field(default=None, ge=0, le=20)
    return_tokens_as_token_ids: Optional[StrictBool] = None
    stop: Union[StrictStr, list[StrictStr], None] = None
    seed: Optional[StrictInt] = None
    stream: Optional[StrictBool] = False
    ignore_eos: Optional[StrictBool] = None

    @property
    def wants_token_info(self) -> bool:
        return bool(self.logprobs) or bool(self.return_tokens_as_token_ids)


class TokenizeChatRequest(_ChatBase):
    add_generation_prompt: StrictBool = True


class TokenizeTextRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    prompt: StrictStr
    model: Optional[StrictStr] = None
    add_special_tokens: StrictBool = True


def error_body(message: str, *, status: int = 400, param: str | None = None, kind: str | None = None) -> dict:
    """OpenAI-style error (vLLM's shape); `message` always names the cause."""
    kind = kind or ("invalid_request_error" if status < 500 else "internal_error")
    return {"object": "error", "error": {"message": message, "type": kind, "param": param, "code": status}}


def describe_validation_errors(errors: list[dict]) -> tuple[str, str | None]:
    """pydantic / FastAPI errors -> ("field.path: reason; ...", first field path)."""
    parts, first = [], None
    for err in errors[:5]:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        # union members appear in loc as type names; keep the field path readable
        loc = [x for x in loc if not x.startswith(("str", "list[", "dict[", "int", "float", "bool", "function-", "literal["))]
        path = ".".join(loc) or "body"
        if err.get("type") == "json_invalid":
            path = "body"
            msg = f"invalid JSON ({err.get('ctx', {}).get('error', 'decode error')})"
        else:
            msg = err.get("msg", "invalid")
        first = first or path
        parts.append(f"{path}: {msg}")
    return "; ".join(dict.fromkeys(parts)), first
