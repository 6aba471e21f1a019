"""Fixtures for weight-sync tests: tiny checkpoints, a demo policy server process, references.

The server (`megagym.testing.vllm_app`, test-only) runs in its own session/process group so that
teardown can stop it and its vLLM EngineCore/Worker children together. One server per test
module: engine start-up costs ~30 s on 2 cores.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from megagym.weights.sync.buckets import leaked_segments
from megagym.testing.vllm_app import VLLMTestServer

# Fixed prompts (token ids < 151k) scored by teacher forcing on both sides.
PROMPTS = [
    [151644, 872, 198, 9707, 11, 1879, 0, 42, 17, 99, 123, 4567, 891, 3000],
    [1000, 2000, 3000, 4000, 5000, 6000, 7000, 8000, 9000, 10000, 11000],
    [13, 13, 13, 220, 220, 151645, 198, 77091, 198, 5, 6, 7],
]


def start_server(model: Path, log_path: Path, backend: str = "shm") -> VLLMTestServer:
    return VLLMTestServer(str(model), log_path=log_path, backend=backend).start(timeout_s=300)


def wait_for(condition, timeout_s: float = 120.0, what: str = "condition") -> None:
    """Poll `condition()` until it is true; fail after `timeout_s` (a bound, not a duration assumed)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")
        time.sleep(0.05)


_MODELS: dict[str, torch.nn.Module] = {}


def reference_logprobs(model_dir: Path, prompts=PROMPTS) -> list[list[float]]:
    """Teacher-forced log p(token_i | tokens_<i) from a transformers fp32 forward (the trainer's view)."""
    from transformers import AutoModelForCausalLM

    key = str(model_dir)
    if key not in _MODELS:
        _MODELS[key] = AutoModelForCausalLM.from_pretrained(key, dtype=torch.float32).eval()
    model = _MODELS[key]
    out = []
    with torch.no_grad():
        for ids in prompts:
            logits = model(torch.tensor([ids])).logits[0].float()
            lp = torch.log_softmax(logits, dim=-1)
            out.append([lp[i - 1, ids[i]].item() for i in range(1, len(ids))])
    return out


def max_abs_diff(a: list[list[float]], b: list[list[float]]) -> float:
    assert [len(x) for x in a] == [len(y) for y in b]
    return max(abs(x - y) for xa, ya in zip(a, b) for x, y in zip(xa, ya))


def hf_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """What the trainer's exporter yields: full HF-named tensors (read here from safetensors)."""
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


@pytest.fixture(scope="module")
def no_leaked_segments():
    before = set(leaked_segments())
    yield
    assert set(leaked_segments()) - before == set(), "weight-sync /dev/shm segments leaked"
