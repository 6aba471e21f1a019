"""One-shot prompt rows: a system line and one worked example turn before each question.

Owns: building a row's `responses_create_params.input` from a system line, one worked example
(question, answer) and the question, and splitting generated questions into train/validation sets
that share no question (and never contain the worked example). The prompt format is data: it is
written into every row, so the rollout path sends the rows unchanged and a run's prompts can be
read in its JSONL files.
Must not: choose the questions, the wording or the answer format (the generators do).
"""

from __future__ import annotations

from typing import Callable, Iterable


def one_shot_input(system: str, example_question: str, example_answer: str, question: str) -> list[dict]:
    """The chat input of a one-shot row."""
    return [{"role": "system", "content": system},
            {"role": "user", "content": example_question},
            {"role": "assistant", "content": example_answer},
            {"role": "user", "content": question}]


def take_unique(candidates: Iterable[dict], size: int, key: Callable[[dict], str], exclude: set[str],
                patience: int = 10_000, what: str = "questions") -> list[dict]:
    """The first `size` candidates whose key is neither in `exclude` nor taken already; adds the keys taken
    to `exclude`. Raises when the candidates run out or `patience` in a row bring nothing new (an endless
    generator over a question space too small for `size`)."""
    out: list[dict] = []
    misses = 0
    for c in candidates:
        k = key(c)
        if k in exclude:
            misses += 1
            if misses >= patience:
                break
            continue
        misses = 0
        exclude.add(k)
        out.append(c)
        if len(out) == size:
            return out
    raise ValueError(f"{what}: only {len(out)} distinct questions available, {size} asked for "
                     "(a smaller split size or a wider task configuration fixes it)")
