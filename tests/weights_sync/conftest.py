"""Fixtures for weight-sync tests: tiny checkpoints, a demo policy server process, references.

The server (`megagym.weights.sync.demo_server`) runs in its own session/process group so that
teardown can stop it and its vLLM EngineCore/Worker children together. One server per test
module: engine start-up costs ~30 s on 2 cores.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import torch

from megagym.weights.sync.buckets import leaked_segments

# Fixed prompts (token ids < 151k) scored by teacher forcing on both sides.
PROMPTS = [
    [151644, 872, 198, 9707, 11, 1879, 0, 42, 17, 99, 123, 4567, 891, 3000],
    [1000, 2000, 3000, 4000, 5000, 6000, 7000, 8000, 9000, 10000, 11000],
    [13, 13, 13, 220, 220, 151645, 198, 77091, 198, 5, 6, 7],
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DemoServer:
    def __init__(self, model: Path, log_path: Path, backend: str = "shm"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false")
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "megagym.weights.sync.demo_server", "--model", str(model),
             "--port", str(self.port), "--backend", backend],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        self.log_path = log_path

    def wait_ready(self, timeout_s: float = 240.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"demo server exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                if requests.get(self.url + "/demo/ready", timeout=2).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        raise TimeoutError(f"demo server not ready in {timeout_s} s:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGINT)  # uvicorn shuts the engine down in the lifespan
            try:
                self.proc.wait(12)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        try:  # anything left in the group (EngineCore, Worker)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.log.close()

    # -- measuring helpers ----------------------------------------------------------------
    def score(self, prompts=PROMPTS) -> list[list[float]]:
        r = requests.post(self.url + "/demo/score", json={"prompts": prompts}, timeout=120)
        r.raise_for_status()
        return r.json()["logprobs"]

    def info(self) -> dict:
        r = requests.get(self.url + "/weights/info", timeout=30)
        r.raise_for_status()
        return r.json()


def start_server(model: Path, log_path: Path, backend: str = "shm") -> DemoServer:
    server = DemoServer(model, log_path, backend)
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server


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
