"""`timed(metrics, name)`: how long a block took, added to `metrics["time/<name>"]`.

Owns: the one way the loop times its phases (generation, training, sync, checkpoint, step); a
phase timed twice in a step adds up. Must not: log or print (the metrics writer does).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def timed(metrics: dict, name: str) -> Iterator[None]:
    key = f"time/{name}"
    t0 = time.monotonic()
    try:
        yield
    finally:
        metrics[key] = metrics.get(key, 0.0) + time.monotonic() - t0
