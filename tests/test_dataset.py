"""Gym JSONL reading and the resumable prompt cursor."""

import json

import pytest

from megagym.data.dataset import DatasetError, PromptCursor, read_rows


def test_cursor_covers_each_epoch_once_and_resumes_exactly():
    c = PromptCursor(10, seed=3)
    first = c.take(4) + c.take(4) + c.take(2)
    assert sorted(first) == list(range(10))
    state = c.state_dict()
    cont = c.take(7)
    resumed = PromptCursor(10, seed=3)
    resumed.load_state_dict(state)
    assert resumed.take(7) == cont
    assert first != list(range(10))  # shuffled


def test_cursor_refuses_other_dataset():
    c = PromptCursor(10, seed=3)
    with pytest.raises(DatasetError, match="10 rows with seed 3"):
        PromptCursor(11, seed=3).load_state_dict(c.state_dict())


def test_read_rows_names_line(tmp_path):
    p = tmp_path / "d.jsonl"
    good = {"responses_create_params": {"input": [{"role": "user", "content": "hi"}]}}
    p.write_text(json.dumps(good) + "\n" + json.dumps({"x": 1}) + "\n")
    with pytest.raises(DatasetError, match=r"d.jsonl:2: row has no responses_create_params.input"):
        read_rows(p)
    assert read_rows(p, limit=1) == [good]
