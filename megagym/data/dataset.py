"""Gym JSONL rows and the order in which training consumes them.

Owns: reading Gym-format JSONL (one row per line with `responses_create_params`), and
`PromptCursor`, a seeded, resumable walk over the rows in shuffled epochs whose state is saved
in checkpoints so that a resumed run neither repeats nor skips a prompt. Must not: talk to Gym
or stamp sampling parameters (the rollout manager does that).
"""

from __future__ import annotations

import json
import random
from pathlib import Path


class DatasetError(ValueError):
    """A dataset file or row problem; the message names the file and line."""


def read_rows(path: str | Path, limit: int | None = None) -> list[dict]:
    """Rows of a Gym JSONL file, each checked for `responses_create_params.input`."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"dataset {path} does not exist")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}:{lineno}: not JSON ({e.msg})") from None
            params = row.get("responses_create_params") if isinstance(row, dict) else None
            if not isinstance(params, dict) or "input" not in params:
                raise DatasetError(f"{path}:{lineno}: row has no responses_create_params.input")
            rows.append(row)
            if limit is not None and len(rows) >= limit:
                break
    if not rows:
        raise DatasetError(f"dataset {path} has no rows")
    return rows


class PromptCursor:
    """Deterministic shuffled epochs over `num_rows` row indices, resumable from `state_dict()`.

    `take(k)` returns the next k indices (crossing epoch boundaries); the state after a take is
    exactly what a checkpoint must store for the run to continue with the following prompt.
    """

    def __init__(self, num_rows: int, seed: int, shuffle: bool = True):
        if num_rows <= 0:
            raise DatasetError("cannot iterate an empty dataset")
        self.num_rows = num_rows
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(self.num_rows))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.position >= self.num_rows:
                self.epoch += 1
                self.position = 0
                self._order = self._epoch_order(self.epoch)
            n = min(k - len(out), self.num_rows - self.position)
            out.extend(self._order[self.position:self.position + n])
            self.position += n
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_rows": self.num_rows, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        if state["num_rows"] != self.num_rows or state["seed"] != self.seed:
            raise DatasetError(
                f"checkpoint was taken over {state['num_rows']} rows with seed {state['seed']}, "
                f"this run has {self.num_rows} rows with seed {self.seed}")
        self.epoch = state["epoch"]
        self.position = state["position"]
        self.shuffle = state.get("shuffle", self.shuffle)
        self._order = self._epoch_order(self.epoch)
