"""Gym-side half of megagym's training-token capture: Gym's own finalizer behind a pipe.

Runs under Gym's interpreter (`.venv-gym/bin/python envs/token_capture/finalize.py CAPTURE_DIR`),
started and fed by `megagym/rollout/capture.py` (megagym itself never imports nemo_gym). One JSON
request per stdin line, one JSON answer per stdout line:

  {"op": "finalize", "result": {... /run result with "_ng_rollout_id" ...}}
      -> Gym's `finalize_rollout_token_capture(result, TokenCaptureStore(CAPTURE_DIR))`: freezes the
         rollout's captured calls, rebuilds `response.output` with the token fields (Gym's
         prefix-merging builder, lineage and contiguity checks) or masks the rollout (incomplete
         capture, unresolved parent, no records, ambiguous chains).
         Answer {"ok": true, "result": <the rebuilt result>, "build": {"mask_sample", "error",
         "metrics", "can_retire"}}. The build stays here until released.
  {"op": "release", "rollout_id": ID, "retire": true|false}
      -> retire=true: Gym's `retire_rollout_token_capture` (drops exactly the frozen snapshot)
         once megagym holds the sample; false: keep the capture on disk as evidence (refused or
         failed rollouts). Answer {"ok": true, "retired": bool}.

Every 256 releases, retired tombstones older than 10 minutes are swept (Gym's `sweep_retired`).
Any error answers {"ok": false, "error": "..."}; the process ends at end of input.
Must not: decide what megagym trains on (capture.py does, from the build), or write anything but
what Gym's own store does.
"""

from __future__ import annotations

import asyncio
import json
import sys
import warnings
from pathlib import Path

from nemo_gym.rollout_correlation import maybe_rollout_id_from_run_body
from nemo_gym.token_id_capture.delivery import (
    capture_build_can_retire,
    finalize_rollout_token_capture,
    retire_rollout_token_capture,
)
from nemo_gym.token_id_capture.store import TokenCaptureStore

SWEEP_EVERY = 256
SWEEP_AGE_S = 600.0


async def handle(req: dict, source: TokenCaptureStore, builds: dict, released: list[int]) -> dict:
    op = req.get("op")
    if op == "finalize":
        result = req["result"]
        rollout_id = maybe_rollout_id_from_run_body(result)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            built = await finalize_rollout_token_capture(result, source)
        if built is None:
            return {"ok": False, "error": "Gym's finalizer had no token source"}
        if rollout_id is not None:
            builds[rollout_id] = built
        return {"ok": True, "result": result, "build": {
            "mask_sample": bool(built.get("mask_sample")),
            "error": built.get("error"),
            "metrics": built.get("metrics") or {},
            "redundant": bool(built.get("_redundant_capture")),
            "can_retire": capture_build_can_retire(built),
            "warnings": [str(w.message) for w in caught],
        }}
    if op == "release":
        built = builds.pop(req["rollout_id"], None)
        retired = False
        if req.get("retire") and built is not None:
            retired = await retire_rollout_token_capture(req["rollout_id"], source, built)
        released[0] += 1
        if released[0] % SWEEP_EVERY == 0:
            await asyncio.to_thread(source.sweep_retired, SWEEP_AGE_S)
        return {"ok": True, "retired": retired}
    return {"ok": False, "error": f"unknown op {op!r}"}


async def main(capture_dir: str) -> None:
    source = TokenCaptureStore(Path(capture_dir))
    builds: dict = {}  # rollout id -> Gym's build, from finalize until release
    released = [0]
    try:
        for line in sys.stdin:
            if not line.strip():
                continue
            try:
                answer = await handle(json.loads(line), source, builds, released)
            except Exception as e:  # answer, never die: the next rollout must still be served
                answer = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            sys.stdout.write(json.dumps(answer) + "\n")
            sys.stdout.flush()
    finally:
        await source.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
