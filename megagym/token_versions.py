"""Which weight version generated each token: the record both sides of a rollout agree on.

Owns: the key that names one model call (`generation_key`, from its prompt and generation token
ids, which Gym's model proxy passes through while it drops every other field of the policy
server's answer), the boundary form of per-token versions (`[[start_index, version], ...]`, one
pair per weight version the call's generated tokens came from, in order) and its expansion to one
version per token, and `TokenVersionLedger`, the policy server's bounded record of the boundaries of
each finished call until the rollout side collects them.
Must not: import torch, vLLM or HTTP code; the server (megagym.server) and the rollout manager both
import it.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Sequence

Boundaries = list[list[int]]  # [[start_index, version], ...], start_index strictly increasing from 0


def generation_key(prompt_ids: Sequence[int], generation_ids: Sequence[int]) -> str:
    """A stable name for one model call: sha256 over its prompt and generated token ids."""
    h = hashlib.sha256()
    h.update(",".join(map(str, prompt_ids)).encode())
    h.update(b"|")
    h.update(",".join(map(str, generation_ids)).encode())
    return h.hexdigest()


def check_boundaries(boundaries: Sequence[Sequence[int]], n_tokens: int) -> Boundaries:
    """`boundaries` as a list of [start, version] pairs, or ValueError naming what is wrong."""
    out: Boundaries = []
    for pair in boundaries:
        if len(pair) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in pair):
            raise ValueError(f"weight-version boundary {pair!r}: expected [start_index, version] integers")
        start, version = int(pair[0]), int(pair[1])
        if out and (start <= out[-1][0] or version < out[-1][1]):
            raise ValueError(f"weight-version boundaries {list(boundaries)!r}: starts must increase and "
                             "versions must not decrease")
        if start < 0 or (n_tokens and start >= n_tokens) or (not out and start != 0):
            raise ValueError(f"weight-version boundaries {list(boundaries)!r}: the first start must be 0 and "
                             f"every start inside the {n_tokens} generated tokens")
        out.append([start, version])
    if not out:
        raise ValueError("weight-version boundaries: empty")
    return out


def expand(boundaries: Sequence[Sequence[int]], n_tokens: int) -> list[int]:
    """One version per generated token from its boundaries."""
    b = check_boundaries(boundaries, n_tokens)
    out: list[int] = []
    for i, (start, version) in enumerate(b):
        end = b[i + 1][0] if i + 1 < len(b) else n_tokens
        out.extend([version] * (end - start))
    return out


def compress(versions: Sequence[int]) -> Boundaries:
    """The boundary form of a per-token version list (inverse of `expand`)."""
    out: Boundaries = []
    for i, v in enumerate(versions):
        if not out or out[-1][1] != v:
            out.append([i, int(v)])
    return out


class TokenVersionLedger:
    """The server's record of finished calls: key -> boundaries, bounded, each entry read once.

    Two calls with the same prompt and the same generation (short answers in one group) share a
    key; their records queue under it and each read takes the oldest. The oldest keys are
    forgotten past `max_entries` (a rollout side that never reads must not grow the server)."""

    def __init__(self, max_entries: int = 65536):
        self.max_entries = max_entries
        self._entries: OrderedDict[str, list[Boundaries]] = OrderedDict()
        self._count = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._count

    def record(self, key: str, boundaries: Boundaries) -> None:
        with self._lock:
            self._entries.setdefault(key, []).append([list(p) for p in boundaries])
            self._entries.move_to_end(key)
            self._count += 1
            while self._count > self.max_entries:
                _, dropped = self._entries.popitem(last=False)
                self._count -= len(dropped)

    def take(self, keys: Sequence[str]) -> list[Boundaries | None]:
        """For each key (in order; a key may repeat), its oldest record, removed; None where there is none."""
        found: list[Boundaries | None] = []
        with self._lock:
            for key in keys:
                queue = self._entries.get(key)
                if not queue:
                    found.append(None)
                    continue
                found.append(queue.pop(0))
                self._count -= 1
                if not queue:
                    del self._entries[key]
        return found
