"""The app and the weight-update hook without vLLM's engine: a fake AsyncLLM records calls."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from megagym.server.app import create_app
from megagym.server.config import ServerConfig
from megagym.server.engine import update_weights


class FakeLLM:
    def __init__(self, tok):
        self.calls: list[str] = []
        self.errored = False
        self.tok = tok
        self.model_config = SimpleNamespace(
            get_vocab_size=lambda: 151936, max_model_len=256, hf_config=SimpleNamespace(eos_token_id=151645)
        )

    async def pause_generation(self, mode="abort", clear_cache=True):
        self.calls.append(f"pause:{mode}")

    async def resume_generation(self):
        self.calls.append("resume")

    async def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")

    async def update_weight_version(self, v):
        self.calls.append(f"version:{v}")

    async def generate(self, prompt, params, request_id):
        gen = [100, 200]
        lps = [{t: SimpleNamespace(logprob=-1.5, rank=1, decoded_token="x")} for t in gen]
        out = SimpleNamespace(index=0, text=self.tok.decode(gen), token_ids=gen, logprobs=lps,
                              finish_reason="length", stop_reason=None)
        yield SimpleNamespace(outputs=[out])

    def shutdown(self, timeout=None):
        self.calls.append("shutdown")


@pytest.fixture()
def fake(tiny_qwen3):
    from transformers import AutoTokenizer

    cfg = ServerConfig(model=str(tiny_qwen3), api_key="sekrit", tool_parser="hermes")
    llm = FakeLLM(AutoTokenizer.from_pretrained(str(tiny_qwen3)))

    async def factory(c):
        return llm

    with TestClient(create_app(cfg, engine_factory=factory)) as client:
        yield client, llm


def test_api_key(fake):
    client, _ = fake
    assert client.get("/health").status_code == 200  # health is open
    r = client.get("/v1/models")
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    auth = {"authorization": "Bearer sekrit"}
    assert client.get("/v1/models", headers=auth).status_code == 200
    r = client.post("/v1/chat/completions", headers=auth, json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["generation_token_ids"] == [100, 200]


def test_max_tokens_clamped_to_context(fake):
    client, _ = fake
    auth = {"authorization": "Bearer sekrit"}
    r = client.post("/v1/chat/completions", headers=auth,
                    json={"messages": [{"role": "user", "content": "word " * 300}], "max_tokens": 2})
    assert r.status_code == 400 and "context length" in r.json()["error"]["message"]


def test_update_weights_hook_order_and_version(fake):
    client, llm = fake
    state = client.app.state
    assert state.engine is llm and state.weight_version == 0

    async def apply(l):
        l.calls.append("apply")

    assert client.portal.call(update_weights, state, apply) == 1
    assert llm.calls[-5:] == ["pause:wait", "apply", "reset_prefix_cache", "version:1", "resume"]
    h = client.get("/health")
    assert h.json()["weight_version"] == 1 and h.headers["x-weight-version"] == "1"

    async def broken(l):
        raise RuntimeError("transfer failed")

    with pytest.raises(RuntimeError):
        client.portal.call(update_weights, state, broken)
    assert llm.calls[-1] == "resume" and state.weight_version == 1  # resumed, version unchanged

    async def to_seven():
        return await update_weights(state, apply, version=7, mode="abort")

    assert client.portal.call(to_seven) == 7
    auth = {"authorization": "Bearer sekrit"}
    r = client.post("/v1/chat/completions", headers=auth, json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.json()["weight_version"] == 7 and r.headers["x-weight-version"] == "7"


def test_weight_sync_routes_mount(tiny_qwen3):
    """`weight_sync=shm` mounts megagym.weights.sync's router on this app (same app.state contract)."""
    pytest.importorskip("megagym.weights.sync.routes")
    cfg = ServerConfig(model=str(tiny_qwen3), weight_sync="shm")
    app = create_app(cfg, engine_factory=None)
    assert any(getattr(r, "path", "") == "/weights/info" for r in app.routes)


def test_vllm_parsers_split_reasoning_and_tool_calls(tiny_qwen3):
    """vLLM's qwen3 reasoning parser and hermes tool parser on Qwen3-shaped output (the random
    model never writes these, so the engine is faked)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_qwen3))
    text = ('<think>\nThe user wants weather.\n</think>\n\nLet me check.\n<tool_call>\n'
            '{"name": "get_weather", "arguments": {"city": "SF"}}\n</tool_call>')
    gen = tok.encode(text, add_special_tokens=False) + [tok.convert_tokens_to_ids("<|im_end|>")]
    llm = FakeLLM(tok)

    async def generate(prompt, params, request_id):
        lps = [{t: SimpleNamespace(logprob=-0.5, rank=1, decoded_token="x")} for t in gen]
        out = SimpleNamespace(index=0, text=text, token_ids=gen, logprobs=lps, finish_reason="stop", stop_reason=None)
        yield SimpleNamespace(outputs=[out])

    llm.generate = generate

    async def factory(c):
        return llm

    cfg = ServerConfig(model=str(tiny_qwen3), reasoning_parser="qwen3")
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    with TestClient(create_app(cfg, engine_factory=factory)) as client:
        r = client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "weather in SF?"}], "tools": tools, "max_tokens": 64})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    msg = choice["message"]
    assert msg["reasoning_content"].strip() == "The user wants weather."
    assert msg["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "SF"}'}
    assert msg["content"].strip() == "Let me check."
    assert choice["finish_reason"] == "tool_calls"
    assert msg["generation_token_ids"] == gen
