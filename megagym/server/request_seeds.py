"""Per-request sampling seeds: the same requests to a server give the same samples on every run.

Owns: `RequestSeeds`, which gives a chat request that carries no `seed` of its own a seed derived
from the server's seed (`ServerConfig.seed`), the weight version the request is served under, its
prompt token IDs and how many earlier requests with that version and prompt this server has seen
(the k-th copy of a prompt in a GRPO group gets the k-th seed, so copies still differ). vLLM then
samples the request from its own generator instead of the engine's shared one, whose draws depend
on which other requests share each batch: arrival timing. That timing is the run-to-run variance of
a CPU run; with derived seeds two runs of one config on one server sample the same tokens (on GPU,
where kernels are not batch-invariant, logits can still differ in the last bits).
The count table holds one entry per (prompt) under the current weight version; a new version
empties it, and past `max_prompts` prompts under one version (65,536, a few MB) it empties and
starts a new epoch (part of the seed): no seed is given twice, but which prompts count in which
epoch then follows arrival order.
Must not: touch requests that carry a `seed` (OpenAI semantics: the client's seed is used as given),
or import vLLM or HTTP code.
"""

from __future__ import annotations

import hashlib
from array import array
from typing import Sequence

SEED_BITS = 62  # vLLM gives the children of an n > 1 request seed + index: stay clear of int64's top


class RequestSeeds:
    def __init__(self, server_seed: int, max_prompts: int = 1 << 16) -> None:
        self.server_seed = int(server_seed)
        self.max_prompts = max_prompts
        self.version: int | None = None
        self.epoch = 0
        self.seen: dict[bytes, int] = {}

    def derive(self, prompt_ids: Sequence[int], weight_version: int) -> int:
        """The seed of the next request with this prompt under `weight_version` (call on one thread)."""
        if weight_version != self.version:
            self.version, self.epoch = weight_version, 0
            self.seen.clear()
        elif len(self.seen) >= self.max_prompts:
            self.epoch += 1
            self.seen.clear()
        prompt = hashlib.blake2b(array("q", prompt_ids).tobytes(), digest_size=16).digest()
        count = self.seen.get(prompt, 0)
        self.seen[prompt] = count + 1
        h = hashlib.blake2b(digest_size=8)
        h.update(f"{self.server_seed}:{weight_version}:{self.epoch}:{count}:".encode())
        h.update(prompt)
        return int.from_bytes(h.digest(), "little") >> (64 - SEED_BITS)
