"""`megagym data prepare arithmetic|reasoning_gym`: seeded rows whose train and validation splits share
no question, with the prompt format (system line, one worked example) written into every row.

reasoning_gym rows come from Gym's own scripts/create_dataset.py in .venv-gym (small sizes here).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megagym.data import arithmetic, reasoning_gym
from megagym.data.dataset import read_rows

REPO = Path(__file__).resolve().parents[1]


def _check_splits(splits: dict, example_q: str | None = None) -> None:
    train = {r["question"] for r in splits["train"]}
    val = {r["question"] for r in splits["validation"]}
    assert len(train) == len(splits["train"]) and len(val) == len(splits["validation"])  # no duplicates
    assert not train & val, sorted(train & val)[:5]
    for rows in splits.values():
        for r in rows:
            msgs = r["responses_create_params"]["input"]
            assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
            assert msgs[-1]["content"] == r["question"]
            assert msgs[1]["content"] != r["question"]  # the worked example is never the question
            if example_q is not None:
                assert msgs[1]["content"] == example_q


def test_arithmetic_splits_are_disjoint_and_seeded(tmp_path):
    kw = dict(train_size=600, validation_size=100, transfer_size=40, train_seed=1, validation_seed=2, transfer_seed=3)
    a, b = arithmetic.build(**kw), arithmetic.build(**kw)
    assert a == b  # deterministic
    _check_splits(a, arithmetic.EXAMPLE_Q)
    assert {r["operation"] for r in a["validation"]} == {"+", "-", "*"}
    for r in a["train"] + a["validation"]:
        x, op, y = r["question"][len("What is "):-1].split()
        assert str(eval(f"{x}{op}{y}")) == r["expected_answer"]  # noqa: S307 (our own digits)
        assert "\\boxed{}" in r["responses_create_params"]["input"][0]["content"]
    assert all(not r["question"].startswith("What is") for r in a["transfer"])  # phrased differently
    with pytest.raises(ValueError, match="must differ"):
        arithmetic.build(**{**kw, "validation_seed": 1})
    with pytest.raises(ValueError, match="distinct questions"):
        arithmetic.build(**{**kw, "train_size": 100000})
    written = arithmetic.prepare(tmp_path, **kw)
    assert sorted(Path(p).name for p in written) == ["train.jsonl", "transfer.jsonl", "validation.jsonl"]
    assert len(read_rows(tmp_path / "arithmetic" / "validation.jsonl")) == 100


@pytest.mark.gym
def test_reasoning_gym_rows_from_gyms_own_script(tmp_path):
    if not (REPO / ".venv-gym" / "bin" / "python").exists():
        pytest.skip("Gym's venv is not built (scripts/setup_gym.sh)")
    kw = dict(train_size=24, validation_size=12, transfer_size=4, train_seed=11, validation_seed=12,
              transfer_seed=13, example_seed=10, venv=str(REPO / ".venv-gym"))
    s = reasoning_gym.build(**kw)
    _check_splits(s)
    tasks = [r["metadata"]["source_dataset"] for r in s["validation"]]
    assert tasks[:2] == list(reasoning_gym.TRAIN_TASKS)  # interleaved: a validation limit covers every task
    assert {r["metadata"]["source_dataset"] for r in s["transfer"]} == set(reasoning_gym.TRANSFER_TASKS)
    assert not {r["metadata"]["source_dataset"] for r in s["transfer"]} & set(reasoning_gym.TRAIN_TASKS)
    for r in s["train"]:
        assert r["agent_ref"]["name"] == "reasoning_gym_simple_agent" and r["answer"]  # what the verifier reads
        task = r["metadata"]["source_dataset"]
        ex = reasoning_gym.create(task, reasoning_gym.TRAIN_TASKS[task], 1, 10, kw["venv"])[0]
        assert r["responses_create_params"]["input"][1:3] == [  # the worked example: working, then \\boxed{}
            {"role": "user", "content": ex["question"]},
            {"role": "assistant", "content": f"{reasoning_gym.WORKING[task](ex['metadata'], ex['answer'])} "
                                             f"The answer is \\boxed{{{ex['answer']}}}."}]
    with pytest.raises(ValueError, match="must differ"):
        reasoning_gym.build(**{**kw, "example_seed": 11})
    json.dumps(s)  # rows are plain JSON
