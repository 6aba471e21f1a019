"""Weight sync through vLLM's own GPU backends (`ipc` colocated, `nccl` across GPUs).

Marked `gpu`: skipped without CUDA, and also skipped where vLLM has no CUDA build (the lent
GPU machines of this project carry no vLLM), so these have not run in this repository yet.
Same checks as the CPU tests: logprobs after a sync match a transformers forward of the sent
checkpoint (fp32; looser tolerance for GPU kernels), and the weight version bumps.
"""

from __future__ import annotations

import pytest
import torch

from megagym.testing.tiny_qwen3 import write_tiny_qwen3
from megagym.testing.vllm_app import VLLMTestServer
from megagym.weights.sync.sender import make_sender

from .conftest import PROMPTS, hf_weights, max_abs_diff, reference_logprobs

pytestmark = [pytest.mark.gpu, pytest.mark.vllm, pytest.mark.slow]


def _vllm_cuda() -> bool:
    try:
        from vllm.platforms import current_platform

        return current_platform.is_cuda()
    except Exception:
        return False


@pytest.mark.parametrize("backend", ["ipc", "nccl"])
def test_gpu_backend_sync_matches_trainer(backend, tmp_path):
    if not _vllm_cuda():
        pytest.skip("vLLM without CUDA support")
    if backend == "nccl" and torch.cuda.device_count() < 2:
        pytest.skip("nccl needs the trainer and the engine on different GPUs")
    a, b = write_tiny_qwen3(tmp_path / "A", seed=0), write_tiny_qwen3(tmp_path / "B", seed=1)
    env = {"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}
    if backend == "nccl":
        env["CUDA_VISIBLE_DEVICES"] = "1"  # engine on GPU 1, trainer (this process) on GPU 0
    server = VLLMTestServer(str(a), log_path=tmp_path / "server.log", backend=backend, env=env,
                            extra_args=["--gpu-memory-utilization", "0.3"])
    try:
        server.start(timeout_s=300)
        kw = {"master_address": "127.0.0.1", "master_port": 29561} if backend == "nccl" else {}
        torch.cuda.set_device(0)
        weights = {k: v.cuda() for k, v in hf_weights(b).items()}
        with make_sender(backend, server.url, bucket_bytes=8 << 20, **kw) as sender:
            stats = sender.send(weights.items())
        assert stats.weight_version == 1 and server.info()["weight_version"] == 1
        assert max_abs_diff(server.score(PROMPTS), reference_logprobs(b)) < 2e-3
    finally:
        server.stop()
