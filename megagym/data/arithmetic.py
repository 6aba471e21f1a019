"""`megagym data prepare arithmetic`: one-shot arithmetic rows for Gym's math_with_judge environment.

Owns: generating, from seeds, the questions a small pretrained model can learn on a CPU in minutes:
sums and differences of a two-digit and a one-digit number and products of two one-digit numbers
("What is 47 + 8?"), each row carrying its prompt format (a system line asking for `\\boxed{}` and
one worked example turn) and `expected_answer` for math_with_judge's math-verify check. Writes
`train.jsonl` and `validation.jsonl` (different seeds, no question in both, never the worked
example) and `transfer.jsonl`: the same operations phrased as word problems, with the same system
line and example, to see whether what was learned carries over to wording never trained on.
Must not: talk to Gym or stamp sampling parameters (the rollout manager does that).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Iterator

from megagym.data.oneshot import one_shot_input, take_unique

SYSTEM = "You are a careful calculator. Compute the result and give the final answer in \\boxed{}."
EXAMPLE_Q = "What is 2 + 3?"
EXAMPLE_A = "2 + 3 = 5. The answer is \\boxed{5}."

# word problems over the same operations (transfer set): (template, operation)
WORDS = [
    ("Sam has {a} marbles and finds {b} more. How many marbles does Sam have now?", "+"),
    ("A shelf holds {a} books. Someone adds {b} books. How many books are on the shelf?", "+"),
    ("Mia had {a} stickers and gave away {b}. How many stickers does Mia have left?", "-"),
    ("There were {a} birds on a tree and {b} flew away. How many birds are still on the tree?", "-"),
    ("There are {a} bags with {b} apples in each bag. How many apples are there in total?", "*"),
    ("A box has {a} rows of {b} eggs. How many eggs are in the box?", "*"),
]

# as many training rows as reasoning_gym: the seeded cursor then mixes the two 1:1 (18 steps use ~72 each)
DEFAULTS = {"train_size": 500, "validation_size": 128, "transfer_size": 128,
            "train_seed": 1, "validation_seed": 2, "transfer_seed": 3}


def _operands(rng: random.Random, op: str) -> tuple[int, int]:
    if op == "*":
        return rng.randint(2, 9), rng.randint(2, 9)
    return rng.randint(10, 99), rng.randint(1, 9)


def _value(a: int, b: int, op: str) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def _ops(rng: random.Random) -> str:
    return rng.choice(["+", "+", "-", "-", "*"])  # products are a fifth of the questions


def problems(seed: int) -> Iterator[dict]:
    """An endless seeded stream of arithmetic rows (duplicates possible; callers dedupe)."""
    rng = random.Random(seed)
    while True:
        op = _ops(rng)
        a, b = _operands(rng, op)
        q = f"What is {a} {op} {b}?"
        yield _row(q, _value(a, b, op), op)


def word_problems(seed: int) -> Iterator[dict]:
    rng = random.Random(seed)
    while True:
        template, op = rng.choice(WORDS)
        a, b = _operands(rng, op)
        yield _row(template.format(a=a, b=b), _value(a, b, op), op)


def _row(question: str, answer: int, op: str) -> dict:
    return {"responses_create_params": {"input": one_shot_input(SYSTEM, EXAMPLE_Q, EXAMPLE_A, question)},
            "question": question, "expected_answer": str(answer), "operation": op}


def build(train_size: int, validation_size: int, transfer_size: int, train_seed: int, validation_seed: int,
          transfer_seed: int) -> dict[str, list[dict]]:
    """{split: rows}; validation is drawn first, train skips its questions and the worked example."""
    if train_seed == validation_seed:
        raise ValueError("train_seed and validation_seed must differ")
    key = lambda r: r["question"]  # noqa: E731
    taken = {EXAMPLE_Q}
    validation = take_unique(problems(validation_seed), validation_size, key, taken, what="arithmetic validation")
    train = take_unique(problems(train_seed), train_size, key, taken, what="arithmetic train")
    transfer = take_unique(word_problems(transfer_seed), transfer_size, key, set(), what="arithmetic transfer")
    return {"train": train, "validation": validation, "transfer": transfer}


def prepare(out_root: str | Path = "data", **kw) -> dict[str, int]:
    """Write data/arithmetic/{train,validation,transfer}.jsonl; returns {file: rows}."""
    from megagym.data.prepare import write_jsonl

    splits = build(**{**DEFAULTS, **kw})
    root = Path(out_root) / "arithmetic"
    return {str(root / f"{s}.jsonl"): write_jsonl(rows, root / f"{s}.jsonl") for s, rows in splits.items()}
