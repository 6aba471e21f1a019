"""Shared test fixtures: one tiny random Qwen3 checkpoint per session, GPU/slow markers.

Expensive fixtures (a vLLM engine, a Gym stack) are session-scoped and live in the conftest of
the tests that need them so that the unit tests start fast.
"""

from __future__ import annotations

import os

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


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory):
    """Path of a tiny random Qwen3 HF checkpoint (tied embeddings, 2 layers) shared by all tests."""
    from megagym.testing.tiny_qwen3 import write_tiny_qwen3

    return write_tiny_qwen3(tmp_path_factory.mktemp("tiny_qwen3"), seed=0)
