"""Fixtures of the trainer tests: a second tiny checkpoint with untied embeddings."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_qwen3_untied(tmp_path_factory):
    from megagym.testing.tiny_qwen3 import write_tiny_qwen3

    return write_tiny_qwen3(tmp_path_factory.mktemp("tiny_qwen3_untied"), seed=1, tie_word_embeddings=False)
