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
        self.seeds: list[int | None] = []  # SamplingParams.seed of each generate call
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
        self.seeds.append(params.seed)
        gen = [100, 200]
        lps = [{t: SimpleNamespace(logprob=-1.5, rank=1, decoded_token="x")} for t in gen]
        out = SimpleNamespace(index=0, text=self.tok.decode(gen), token_ids=gen, logprobs=lps,
                              finish_reason="length", stop_reason=None)
        yield SimpleNamespace(outputs=[out])

    def shutdown(self, timeout=None):
        self.calls.append("shutdown")


@pytest.fixture()
def fake(tiny_qwen3, request):
    from transformers import AutoTokenizer

    cfg = ServerConfig(model=str(tiny_qwen3), api_key="sekrit", tool_parser="hermes",
                       request_seeds=getattr(request, "param", False))  # indirect parametrization may set it
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


def test_token_versions_route_needs_auth_and_answers_from_the_ledger(fake):
    """Fake engine without vLLM's spans: the answer is stamped with the version it finished on,
    recorded under its key, and the lookup route sits behind the bearer key like the others."""
    from megagym.token_versions import generation_key

    client, _ = fake
    client.app.state.weight_version = 5
    auth = {"authorization": "Bearer sekrit"}
    msg = client.post("/v1/chat/completions", headers=auth,
                      json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).json()["choices"][0]["message"]
    assert msg["generation_weight_versions"] == [[0, 5]]
    key = generation_key(msg["prompt_token_ids"], msg["generation_token_ids"])
    r = client.post("/megagym/token_versions", json={"keys": [key]})
    assert r.status_code == 401 and r.json()["error"]["param"] == "authorization"
    assert client.post("/megagym/token_versions", headers=auth, json={"keys": [key, key]}).json() == {
        "versions": [[[0, 5]], None]}
    r = client.post("/megagym/token_versions", headers={**auth, "content-type": "application/json"}, content=b"{")
    assert r.status_code == 400 and r.json()["error"]["param"] == "body"
    h = client.get("/health").json()
    assert h["requests_in_flight"] == 0 and h["idle_seconds"] >= 0


def test_token_boundaries_from_vllm_spans():
    from megagym.server.engine import token_boundaries

    def out(*spans):
        return SimpleNamespace(weight_versions=[SimpleNamespace(version=v, start=a, end=b) for v, a, b in spans])

    assert token_boundaries(out(("3", 0, 7)), 9) == [[0, 3]]
    assert token_boundaries(out(("3", 0, 4), ("4", 4, 7)), 9) == [[0, 3], [4, 4]]
    assert token_boundaries(out(("3", 0, 0), ("4", 0, 7)), 9) == [[0, 4]]  # swap before the first token
    assert token_boundaries(out(("3", 0, 2), ("3", 2, 5), ("5", 5, 6)), 9) == [[0, 3], [5, 5]]
    assert token_boundaries(out(), 9) == [[0, 9]]  # no token: the version it finished on
    assert token_boundaries(SimpleNamespace(), 2) == [[0, 2]]  # an engine without spans


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


# -- weight routes under malformed bodies (FakeLLM records the engine calls) ----------------------


class FakeSyncLLM(FakeLLM):
    """FakeLLM plus the weight-transfer calls of vLLM's AsyncLLM, recorded; nothing is moved."""

    def __init__(self, tok):
        super().__init__(tok)
        self.vllm_config = SimpleNamespace(parallel_config=SimpleNamespace(world_size_across_dp=1))

    async def init_weight_transfer_engine(self, request):
        self.calls.append("init")

    async def start_weight_update(self):
        self.calls.append("start_update")

    async def update_weights(self, request):
        self.calls.append("update")

    async def finish_weight_update(self, weight_version=None):
        self.calls.append("finish_update")

    async def collective_rpc(self, name, *args, **kwargs):
        self.calls.append(name)


@pytest.fixture(scope="module")
def sync_server(tiny_qwen3):
    from transformers import AutoTokenizer

    cfg = ServerConfig(model=str(tiny_qwen3), weight_sync="shm")
    llm = FakeSyncLLM(AutoTokenizer.from_pretrained(str(tiny_qwen3)))

    async def factory(c):
        return llm

    with TestClient(create_app(cfg, engine_factory=factory)) as client:
        assert client.post("/weights/init", json={"init_info": {}}).status_code == 200
        yield client, llm


@pytest.fixture()
def sync_app(sync_server):
    """The module's app with no update in progress and an empty call record."""
    client, llm = sync_server
    client.post("/weights/abort")
    llm.calls.clear()
    return client, llm


def paused(llm) -> bool:
    pauses = [i for i, c in enumerate(llm.calls) if c.startswith("pause")]
    resumes = [i for i, c in enumerate(llm.calls) if c == "resume"]
    return bool(pauses) and (not resumes or resumes[-1] < pauses[-1])


@pytest.mark.parametrize("body", [b"garbage", b"[1, 2]", b'{"pause_mode": 5}', b'{"pause_mode": "later"}',
                                  b'{"pause_mode": "wait", "extra": 1}', b'{"pause_mode": NaN}'])
def test_malformed_start_never_starts_an_update(sync_app, body):
    client, llm = sync_app
    r = client.post("/weights/start", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]
    assert "start_update" not in llm.calls and not paused(llm)
    assert client.get("/weights/info").json()["active"] is False


@pytest.mark.parametrize("path, body", [("/weights/update", b"garbage"), ("/weights/update", b'{"update_info": 3}'),
                                        ("/weights/update", b"{}"), ("/weights/update", b'{"update_info": [1]}'),
                                        ("/weights/finish", b'{"weight_version": "x"}')])
def test_malformed_body_during_an_update_abandons_it_and_resumes(sync_app, path, body):
    client, llm = sync_app
    version = client.get("/weights/info").json()["weight_version"]
    assert client.post("/weights/start", json={"pause_mode": "wait"}).status_code == 200
    assert paused(llm)
    r = client.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "abandoned and serving resumed" in r.json()["error"]
    assert not paused(llm) and "megagym_abort_weight_update" in llm.calls
    info = client.get("/weights/info").json()
    assert info["active"] is False and info["weight_version"] == version
    # and a well-formed update still works afterwards
    assert client.post("/weights/start", json={}).status_code == 200
    assert client.post("/weights/update", json={"update_info": {"names": []}}).status_code == 200
    assert client.post("/weights/finish", json={"weight_version": version + 1}).json()["weight_version"] == version + 1
    assert not paused(llm)


def test_weight_routes_fuzzed(sync_app):
    """Generated bodies on every weight route: never a 5xx, never left paused or mid-update."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    client, llm = sync_app
    values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8)),
                          lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                  st.dictionaries(st.text(max_size=6), inner, max_size=3)), max_leaves=8)
    bodies = st.one_of(values, st.fixed_dictionaries({}, optional={
        "pause_mode": values, "update_info": values, "weight_version": values, "init_info": values}))
    @settings(max_examples=80, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    @given(steps=st.lists(st.tuples(st.sampled_from(["init", "start", "update", "finish", "abort"]), bodies),
                          min_size=1, max_size=4))
    def run(steps):
        for route, body in steps:
            r = client.post(f"/weights/{route}", json=body)
            assert r.status_code < 500, r.text
        client.post("/weights/abort")  # what a trainer does after its own failure
        assert not paused(llm) and client.get("/weights/info").json()["active"] is False

    run()


# -- the API key stays off command lines ------------------------------------------------------------


def test_server_process_moves_the_api_key_into_the_environment(tiny_qwen3, tmp_path, monkeypatch):
    from megagym.server import process

    seen = {}

    class RecordingPopen:  # fake: records what would be executed, exits at once
        def __init__(self, cmd, env, **kw):
            seen.update(cmd=cmd, env=env)
            self.returncode, self.pid = 1, 0

        def poll(self):
            return 1

    monkeypatch.setattr(process.subprocess, "Popen", RecordingPopen)
    monkeypatch.setattr(process.os, "killpg", lambda *a: None)
    sp = process.ServerProcess(str(tiny_qwen3), overrides=['dtype="float32"', 'api_key="s3cret key"'],
                               log_path=tmp_path / "serve.log")
    with pytest.raises(RuntimeError):
        sp.start(timeout_s=5, attempts=1)
    assert not any("s3cret" in part for part in seen["cmd"])
    assert seen["env"]["MEGAGYM_API_KEY"] == "s3cret key" and 'dtype="float32"' in seen["cmd"]


def test_serve_cli_reads_the_key_from_env_or_owner_only_file(tmp_path, monkeypatch):
    import os

    from megagym.config import ConfigError
    from megagym.server.cli import parse

    monkeypatch.setenv("MEGAGYM_API_KEY", "from-env")
    cfg, _ = parse(["--model", "/m"])
    assert cfg.api_key == "from-env" and "MEGAGYM_API_KEY" not in os.environ  # engine children do not inherit it
    key = tmp_path / "key"
    key.write_text("from-file\n")
    key.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        parse(["--model", "/m", "--api-key-file", str(key)])
    key.chmod(0o600)
    assert parse(["--model", "/m", "--api-key-file", str(key)])[0].api_key == "from-file"
    assert parse(["--model", "/m"])[0].api_key is None


def test_dtype_auto_is_the_checkpoint_dtype(tiny_qwen3, tmp_path):
    import json

    from megagym.server.engine import checkpoint_dtype

    assert checkpoint_dtype(ServerConfig(model=str(tiny_qwen3))) == "float32"
    assert checkpoint_dtype(ServerConfig(model=str(tiny_qwen3), dtype="bfloat16")) == "bfloat16"
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "bfloat16"}))
    assert checkpoint_dtype(ServerConfig(model=str(tmp_path))) == "bfloat16"


def test_engine_refusals_are_400_naming_the_field(fake):
    """vLLM's own validation errors (not ValueError subclasses) map to 400 with vLLM's parameter."""
    from vllm.exceptions import VLLMValidationError

    client, llm = fake
    auth = {"authorization": "Bearer sekrit"}
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for exc, param in ((VLLMValidationError("bad stop", parameter="stop"), "stop"), (ValueError("too long"), "messages")):
        async def refuse(prompt, params, request_id, exc=exc):
            raise exc
            yield  # an async generator, like AsyncLLM.generate

        llm.generate = refuse
        r = client.post("/v1/chat/completions", headers=auth, json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


@pytest.mark.parametrize("fake", [True, False], ids=["request_seeds", "shared_generator"], indirect=True)
def test_request_seeds_reach_the_engine(fake):
    """request_seeds: copies of one prompt get distinct derived seeds, the same ones again under a
    server with the same settings, new ones under a new weight version; a client's seed is kept.
    Off: the engine sees the client's seed or none (vLLM's shared generator)."""
    from megagym.server.request_seeds import RequestSeeds

    client, llm = fake
    on = client.app.state.cfg.request_seeds
    auth = {"authorization": "Bearer sekrit"}

    def ask(content, **kw):
        r = client.post("/v1/chat/completions", headers=auth,
                        json={"messages": [{"role": "user", "content": content}], "max_tokens": 2, **kw})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["prompt_token_ids"]

    prompt = ask("a")
    ask("a")
    ask("b")
    ask("a", seed=5)
    client.app.state.weight_version = 1
    ask("a")
    if not on:
        assert llm.seeds == [None, None, None, 5, None]
        return
    again = RequestSeeds(client.app.state.cfg.seed)  # what another run of this server derives
    first, second = again.derive(prompt, 0), again.derive(prompt, 0)
    assert llm.seeds[:2] == [first, second] and first != second
    assert llm.seeds[2] not in (first, second) and llm.seeds[3] == 5
    assert llm.seeds[4] == again.derive(prompt, 1) and llm.seeds[4] not in (first, second)
