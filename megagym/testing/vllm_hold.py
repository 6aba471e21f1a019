"""A vLLM logits processor that holds a request in flight until the test lets it go (test-only).

Owns: `HoldWhileFileExists` — while a request of the running batch names an existing file in
`SamplingParams.extra_args["hold_file"]`, the engine step blocks before sampling (so the request
stays in flight, mid-generation) and `<hold_file>.held` is written; deleting the file lets the
step go on. Logits pass through unchanged. Used by `vllm_app.py` (loaded by vLLM in the engine
process, hence its own module). Must not: be loaded by a real run's engine.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.interface import MoveDirectionality

HOLD_TIMEOUT_S = 300.0  # a held request is let go after this long, whatever the test does


class HoldWhileFileExists(LogitsProcessor):
    """Blocks the engine step while a request of the batch names an existing `hold_file` (extra_args)."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        self.holds: dict[int, str] = {}  # batch index -> hold file

    def is_argmax_invariant(self) -> bool:
        return False  # greedy requests must pass through apply() too

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.holds.pop(index, None)
        for index, params, _, _ in batch_update.added:
            path = (params.extra_args or {}).get("hold_file") if params is not None else None
            if path:
                self.holds[index] = path
            else:
                self.holds.pop(index, None)
        for a, b, direction in batch_update.moved:
            pa, pb = self.holds.pop(a, None), self.holds.pop(b, None)
            if pa:
                self.holds[b] = pa
            if pb and direction == MoveDirectionality.SWAP:
                self.holds[a] = pb

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for path in list(self.holds.values()):
            deadline = time.monotonic() + HOLD_TIMEOUT_S
            if os.path.exists(path):
                Path(path + ".held").touch()
            while os.path.exists(path) and time.monotonic() < deadline:
                time.sleep(0.01)
        return logits
