"""Hostile and malformed requests against the real server: one test per cause of a past 5xx or of
unbounded work, each answered with a 4xx naming the field, and nothing malformed reaching the
engine. All tests share the session's one `policy_server` (tests/conftest.py).
"""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

USER = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}


def refused(client, body, path="/v1/chat/completions", status=400, headers=None):
    if isinstance(body, (bytes, str)):
        r = client.post(path, content=body, headers=headers or {"content-type": "application/json"})
    else:
        r = client.post(path, json=body, headers=headers)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    return err["message"], err["param"]


def nested(depth: int) -> str:
    return '{"messages": [{"role": "user", "content": "x"}], "metadata": ' + "[" * depth + "]" * depth + "}"


# the six causes of HTTP 500 in the black-box run, each now a 400 naming the field
@pytest.mark.parametrize(
    "raw, param",
    [
        (nested(50), "metadata"),  # within what json.loads parses: refused by the depth limit
        (nested(100_000), "body"),  # RecursionError inside json.loads
        ('{"messages": [{"role": "user", "content": "hi"}], "stop": "\\ud800"}', "stop"),
        ('{"messages": [{"role": "user", "content": "a\\udfffb"}]}', "messages.0.content"),
        ('{"messages": [{"role": "system", "content": "\\ud83d"}, {"role": "user", "content": "x"}]}', "messages.0.content"),
        ('{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "\\udc00"}}]}',
         "tools.0.function.name"),
        ('{"messages": [{"role": "user", "content": "x"}], "metadata": {"\\ud800": 1}}', "metadata.\\ud800"),
    ],
)
def test_nesting_and_lone_surrogates(client, raw, param):
    message, got = refused(client, raw)
    assert got == param and param in message


def test_surrogate_in_tokenize_prompt_and_valid_pairs_pass(client):
    message, param = refused(client, '{"prompt": "\\ud800 x"}', "/tokenize")
    assert param == "prompt" and "surrogate" in message
    ok = client.post("/tokenize", content='{"prompt": "\\ud83d\\ude00"}', headers={"content-type": "application/json"})
    assert ok.status_code == 200 and ok.json()["count"] >= 1  # a valid pair (an emoji) is fine


@pytest.mark.parametrize(
    "body, param, expect",
    [
        ({"messages": USER, "stop": ""}, "stop", "empty stop string"),
        ({"messages": USER, "stop": ["ok", ""]}, "stop", "empty stop string"),
        ({"messages": USER, "seed": 2**64}, "seed", "less than or equal to 9223372036854775807"),
        ({"messages": USER, "seed": -(2**63) - 1}, "seed", "greater than or equal"),
        # out-of-vocabulary ids when the turn count does not match: the 400 must not crash on decoding
        ({"messages": USER + [{"role": "assistant", "content": "", "prompt_token_ids": [-1, 151645],
                               "generation_token_ids": [2**70], "generation_log_probs": [0.0]},
                              {"role": "user", "content": "y"}]}, "messages", "outside the vocabulary"),
    ],
)
def test_engine_side_causes_are_400(client, body, param, expect):
    message, got = refused(client, body)
    assert got == param and expect in message


@pytest.mark.parametrize(
    "field, value",
    [("response_format", {"type": "json_object"}), ("guided_json", {"type": "object"}), ("guided_regex", "a+"),
     ("guided_choice", ["a"]), ("structured_outputs", {"json": {}}), ("bad_words", ["x"]), ("allowed_token_ids", [1]),
     ("best_of", 2), ("use_beam_search", True), ("length_penalty", 2.0), ("stop_token_ids", [5]),
     ("logits_processors", ["x"]), ("chat_template", "{{ 'x' }}"), ("prompt_logprobs", 1), ("truncate_prompt_tokens", 5),
     ("continue_final_message", True), ("echo", True), ("skip_special_tokens", False), ("include_stop_str_in_output", True),
     ("min_tokens", 3), ("ignore_eos", True), ("logit_bias", {"5": 10}), ("priority", 1), ("vllm_xargs", {})],
)
def test_fields_that_change_or_misstate_sampling_are_refused(client, field, value):
    message, param = refused(client, {"messages": USER, "max_tokens": 2, field: value})
    assert param == field and message.startswith(field)


def test_accepted_bookkeeping_fields_and_validation_names_stream(client):
    body = {"messages": USER, "max_tokens": 2, "metadata": {"k": "v"}, "user": "u", "store": False,
            "parallel_tool_calls": True, "response_format": {"type": "text"}, "return_token_ids": True}
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    message, param = refused(client, {"messages": USER, "stream": "yes"})
    assert param == "stream" and message.startswith("stream:")


def test_bounded_work_limits(client, policy_server):
    limits = (client.get("/health").json())["limits"]
    big = limits["max_request_bytes"] + 1
    # declared size over the limit: refused before the body is read
    message, param = refused(client, b'{"messages": [{"role": "user", "content": "' + b"x" * big + b'"}]}', status=413)
    assert param == "body" and "max_request_bytes" in message
    # a chunked body (no Content-Length) is counted while it streams in
    chunks = (b"x" * 65536 for _ in range(big // 65536 + 2))
    r = client.post("/v1/chat/completions", content=chunks, headers={"content-type": "application/json"})
    assert r.status_code == 413
    many = [{"role": "user", "content": "x"}] * (limits["max_messages"] + 1)
    assert refused(client, {"messages": many})[1] == "messages"
    long = "x" * (limits["max_text_chars"] + 1)
    message, param = refused(client, {"messages": [{"role": "user", "content": long}]})
    assert param == "messages" and "max_text_chars" in message
    assert refused(client, {"prompt": long}, "/tokenize")[1] == "prompt"


def test_content_type_and_json_constants(client):
    message, param = refused(client, json.dumps({"messages": USER}), headers={"content-type": "text/plain"}, status=415)
    assert param == "content-type"
    assert refused(client, '{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}')[1] == "body"


def test_tokenize_checks_token_ids_and_tools(client):
    msgs = USER + [{"role": "assistant", "content": "", "prompt_token_ids": [1, 2], "generation_token_ids": [10**9],
                    "generation_log_probs": [0.0]}, {"role": "user", "content": "y"}]
    message, _ = refused(client, {"messages": msgs}, "/tokenize")
    assert "outside the vocabulary" in message
    msgs[1]["generation_token_ids"], msgs[1]["generation_log_probs"] = [5], ["NaN"]
    assert refused(client, {"messages": msgs}, "/tokenize")[1].startswith("messages.1.generation_log_probs")
    assert refused(client, {"messages": USER, "tools": [{"type": "function", "function": {"name": ""}}]},
                   "/tokenize")[1] == "tools.0.function.name"
    assert refused(client, {"messages": USER, "tools": [{"type": "code_interpreter"}]}, "/tokenize")[1].startswith("tools.0")
    assert refused(client, {"messages": USER, "chat_template_kwargs": {"tokenize": True}}, "/tokenize")[1] == "chat_template_kwargs"


def test_changed_history_is_refused_showing_both_sides(client):
    first = client.post("/v1/chat/completions", json={"messages": [{"role": "system", "content": "be brief"}] + USER,
                                                      "max_tokens": 3}).json()["choices"][0]["message"]
    hist = {"role": "assistant", "content": first["content"] or "",
            **{f: first[f] for f in ("prompt_token_ids", "generation_token_ids", "generation_log_probs")}}
    follow = [hist, {"role": "user", "content": "more"}]
    ok = client.post("/v1/chat/completions", json={"messages": [{"role": "system", "content": "be brief"}] + USER + follow,
                                                   "max_tokens": 2})
    assert ok.status_code == 200, ok.text
    message, param = refused(client, {"messages": [{"role": "system", "content": "be long"}] + USER + follow})
    assert param == "messages" and "from the token fields (decoded)" in message and "be brief" in message
    assert "be long" in message
    message, _ = refused(client, {"messages": [{"role": "system", "content": "be brief"}] + USER + follow, "tools": [TOOL]})
    assert "# Tools" in message  # tools added since that call: the rendered side shows them


def test_health_reports_the_dtype_it_runs(client):
    # the session server runs with the default dtype=auto on an fp32 checkpoint: fp32, not vLLM's bf16
    health = client.get("/health").json()
    assert health["dtype"] == "float32"
