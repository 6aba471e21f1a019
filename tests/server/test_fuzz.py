"""Property-based hostile input (hypothesis): generated bodies for every endpoint of the real
server never get a 5xx, and the engine afterwards answers exactly as before.

Bodies are of three kinds: arbitrary JSON; a valid chat request with one field replaced by
arbitrary JSON (or an unknown field added); a valid request whose text carries arbitrary Unicode.
Generation is kept short (max_tokens <= 4 wherever it is valid) so the examples stay cheap. All
tests share the session's one `policy_server` (tests/conftest.py); the weight-sync routes are
fuzzed against a fake engine in test_app_fake_engine.py (this server has no weight sync).
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

SETTINGS = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))
USER = [{"role": "user", "content": "hi"}]
REFERENCE = {"messages": [{"role": "user", "content": "reference"}], "max_tokens": 6, "seed": 7,
             "logprobs": True, "return_tokens_as_token_ids": True}

scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)
FIELDS = ["messages", "model", "tools", "tool_choice", "temperature", "top_p", "top_k", "n", "stop", "seed",
          "max_tokens", "max_completion_tokens", "logprobs", "top_logprobs", "chat_template_kwargs",
          "required_prefix_token_ids", "response_format", "stream", "metadata", "parallel_tool_calls",
          "add_generation_prompt", "guided_json", "min_tokens", "logit_bias", "prompt"]
MESSAGE_FIELDS = ["role", "content", "name", "tool_calls", "tool_call_id", "reasoning_content",
                  "prompt_token_ids", "generation_token_ids", "generation_log_probs"]


@st.composite
def mutated_chat(draw):
    body = {"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "q"}], "max_tokens": 2}
    where = draw(st.sampled_from(["top", "message", "text"]))
    if where == "top":
        body[draw(st.sampled_from(FIELDS))] = draw(json_values)
    elif where == "message":
        body["messages"][draw(st.integers(0, 1))][draw(st.sampled_from(MESSAGE_FIELDS))] = draw(json_values)
    else:
        body["messages"][1]["content"] = draw(st.text(min_size=1, max_size=200))
    # a valid but long generation costs time, not coverage: keep every valid budget small
    for key, cap in (("max_tokens", 4), ("max_completion_tokens", 4), ("n", 2)):
        if _is_int(body.get(key)) and body[key] > cap:
            body[key] = cap
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_completion_tokens"] = 2
    return body


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


bodies = st.one_of(json_values, mutated_chat())


@pytest.fixture(scope="module")
def reference(client):
    r = client.post("/v1/chat/completions", json=REFERENCE)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]


def _send(client, path, body):
    r = client.post(path, json=body)
    assert r.status_code < 500, f"{path} {body!r} -> {r.status_code}: {r.text[:500]}"
    if r.status_code >= 400:
        assert r.json()["error"]["message"]  # every refusal says why


@SETTINGS
@given(body=bodies)
def test_chat_completions_never_5xx(client, reference, body):
    _send(client, "/v1/chat/completions", body)


@settings(SETTINGS, max_examples=60)
@given(body=bodies)
def test_tokenize_never_5xx(client, reference, body):
    _send(client, "/tokenize", body)


@settings(SETTINGS, max_examples=25)
@given(raw=st.binary(max_size=64), path=st.sampled_from(["/v1/chat/completions", "/tokenize", "/v1/models", "/health"]),
       kind=st.sampled_from(["application/json", "text/plain", None]))
def test_raw_bytes_never_5xx(client, reference, raw, path, kind):
    headers = {"content-type": kind} if kind else {}
    r = client.post(path, content=raw, headers=headers) if path.startswith(("/v1/chat", "/tok")) else client.get(path)
    assert r.status_code < 500, r.text


def test_engine_healthy_and_unchanged_afterwards(client, reference):
    """Runs after the generated requests (file order): same seeded answer, bit for bit."""
    assert client.get("/health").json()["status"] == "ok"
    again = client.post("/v1/chat/completions", json=REFERENCE).json()["choices"][0]["message"]
    assert again["generation_token_ids"] == reference["generation_token_ids"]
    assert again["generation_log_probs"] == pytest.approx(reference["generation_log_probs"], abs=1e-5)
