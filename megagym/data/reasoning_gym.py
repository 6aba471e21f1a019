"""`megagym data prepare reasoning_gym`: one-shot rows for Gym's reasoning_gym environment.

Owns: running Gym's own generator (`resources_servers/reasoning_gym/scripts/create_dataset.py`,
the `reasoning-gym` package, offline and seeded) in Gym's venv, then writing each row's prompt
format into it: the arithmetic rows' system line (answer in `\\boxed{}`) and one worked example (a
question of the same task from its own seed, one line of working, its answer) before the question.
Rows keep `question`, `answer` and `metadata`, which the resources server's verifier (the task's own
`score_answer`) reads. Writes `data/reasoning_gym/{train,validation}.jsonl` from different seeds
with no question in both (nor the worked example), and `transfer.jsonl` from tasks not trained on.
Must not: score answers or change the verifier (Gym's server does that) or import reasoning_gym
(it lives in Gym's Python 3.13 venv).
"""

from __future__ import annotations

import functools
import itertools
import json
import subprocess
import tempfile
from pathlib import Path

from megagym.data.arithmetic import SYSTEM  # one system line for both environments
from megagym.data.oneshot import one_shot_input, take_unique

# The worked example shows one line of working, then the answer in \boxed{} (the reasoning_gym server
# reads `<answer>` tags first and falls back to the first \boxed{}; the task's own score_answer
# scores either). Measured base rates of SmolLM2-135M (HF sampling, temperature 1, 32 questions x 4,
# see docs/smollm2_learning.md): `<answer>` tags and a bare-answer example: chain_sum 0.05, gcd 0.04,
# letter_counting 0.08; with a line of working and \boxed{}: chain_sum (one digit) 0.53, gcd 0.14.
def _equation(m: dict, a: str) -> str:
    return f"{m['expression']} = {a}."


WORKING = {
    "chain_sum": _equation,
    "products": _equation,
    "gcd": lambda m, a: f"The divisors shared by {m['numbers'][0]} and {m['numbers'][1]}: the greatest is {a}.",
    "lcm": lambda m, a: f"The multiples shared by {m['numbers'][0]} and {m['numbers'][1]}: the least is {a}.",
}
EXAMPLE_A = "{working} The answer is \\boxed{{{answer}}}."

# task -> reasoning-gym config; difficulty chosen so that SmolLM2-135M's base pass@1 lies in 10-50%
TRAIN_TASKS = {"chain_sum": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2},
               "products": {"min_digits": 1, "max_digits": 1, "allow_negation": True}}  # -9..9: 361 questions
TRANSFER_TASKS = {"gcd": {"max_value": 30},
                  "lcm": {"min_value": 2, "max_value": 20}}

# as many training rows as the arithmetic environment: the seeded cursor then mixes the two 1:1
DEFAULTS = {"train_size": 500, "validation_size": 128, "transfer_size": 128,
            "train_seed": 11, "validation_seed": 12, "transfer_seed": 13, "example_seed": 10}


def create(task: str, config: dict, size: int, seed: int, venv: str = ".venv-gym") -> list[dict]:
    """`size` rows of `task` from Gym's create_dataset.py, run in Gym's venv (memoised per process)."""
    return [dict(r) for r in _create(task, json.dumps(config, sort_keys=True), size, seed, venv)]


@functools.lru_cache(maxsize=64)
def _create(task: str, config: str, size: int, seed: int, venv: str) -> tuple[dict, ...]:
    from megagym.gym.compose import gym_install_root
    from megagym.gym.config import resolve_path

    script = gym_install_root(venv) / "resources_servers/reasoning_gym/scripts/create_dataset.py"
    python = resolve_path(venv) / "bin" / "python"
    with tempfile.TemporaryDirectory(prefix="megagym-rg-") as tmp:
        out = Path(tmp) / "rows.jsonl"
        cmd = [str(python), str(script), "--task", task, "--size", str(size), "--seed", str(seed),
               "--config", config, "--output", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            raise ValueError(f"reasoning_gym create_dataset.py --task {task} failed (exit {proc.returncode}): "
                             f"{(proc.stdout + proc.stderr).strip()[-800:]}")
        rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    if len(rows) != size:
        raise ValueError(f"reasoning_gym {task}: asked for {size} rows, got {len(rows)}")
    return tuple(rows)


def one_shot(row: dict, example: dict) -> dict:
    """`row` with its prompt replaced by the system line, the worked example and its question."""
    task = example["metadata"]["source_dataset"]
    answer = EXAMPLE_A.format(working=WORKING[task](example["metadata"], example["answer"]), answer=example["answer"])
    row = dict(row)
    row["responses_create_params"] = {"input": one_shot_input(SYSTEM, example["question"], answer, row["question"])}
    return row


def _split(tasks: dict, size: int, seed: int, example_seed: int, taken: set[str], venv: str) -> list[dict]:
    """`size` one-shot rows spread over `tasks`, skipping questions in `taken` (then adding them)."""
    per_task: list[list[dict]] = []
    for i, (task, config) in enumerate(tasks.items()):
        n = size // len(tasks) + (i < size % len(tasks))
        example = create(task, config, 1, example_seed, venv)[0]
        taken.add(example["question"])
        pool = create(task, config, 4 * n + 16, seed, venv)  # room for duplicates
        per_task.append([one_shot(r, example) for r in take_unique(pool, n, lambda r: r["question"], taken,
                                                                  what=f"reasoning_gym {task} {config}")])
    # interleaved, so that the first k rows (a validation limit) cover every task
    return [r for group in itertools.zip_longest(*per_task) for r in group if r is not None]


def build(train_size: int, validation_size: int, transfer_size: int, train_seed: int, validation_seed: int,
          transfer_seed: int, example_seed: int, venv: str = ".venv-gym") -> dict[str, list[dict]]:
    seeds = {train_seed, validation_seed, example_seed}
    if len(seeds) != 3:
        raise ValueError("train_seed, validation_seed and example_seed must differ")
    taken: set[str] = set()
    validation = _split(TRAIN_TASKS, validation_size, validation_seed, example_seed, taken, venv)
    train = _split(TRAIN_TASKS, train_size, train_seed, example_seed, taken, venv)
    transfer = _split(TRANSFER_TASKS, transfer_size, transfer_seed, example_seed, set(), venv)
    return {"train": train, "validation": validation, "transfer": transfer}


def prepare(out_root: str | Path = "data", **kw) -> dict[str, int]:
    """Write data/reasoning_gym/{train,validation,transfer}.jsonl; returns {file: rows}."""
    from megagym.data.prepare import write_jsonl

    splits = build(**{**DEFAULTS, **kw})
    root = Path(out_root) / "reasoning_gym"
    return {str(root / f"{s}.jsonl"): write_jsonl(rows, root / f"{s}.jsonl") for s, rows in splits.items()}
