"""Fixtures of the trainer tests: an untied tiny checkpoint, and one shared 4-rank training run."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_qwen3_untied(tmp_path_factory):
    from megagym.testing.tiny_qwen3 import write_tiny_qwen3

    return write_tiny_qwen3(tmp_path_factory.mktemp("tiny_qwen3_untied"), seed=1, tie_word_embeddings=False)


@pytest.fixture(scope="session")
def trained_run(tiny_qwen3, tmp_path_factory):
    """OUT dir of tests/trainer/worker_train.py (train.json, ckpt/ at TP2xPP2, trained_logits.pt)."""
    from ._common import torchrun

    out = tmp_path_factory.mktemp("trained_run")
    torchrun("worker_train.py", 4, [str(tiny_qwen3), str(out)], timeout=500)
    return out
