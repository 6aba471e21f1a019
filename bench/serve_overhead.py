"""Benchmark: megagym's policy server against vLLM's own OpenAI server, and the on-policy fix cost.

Part 1 (`serve`): the same tiny random Qwen3, the same load — C concurrent conversations of T turns
(each turn: POST /v1/chat/completions with tools, logprobs and token ids, `max_tokens` new tokens;
the answer goes back into the history with its token fields, as Gym does, then a user turn) —
against `megagym serve` and `python -m vllm.entrypoints.openai.api_server`, one server at a time.
Prints requests/s and p50/p99 latency side by side with the ratio (megagym / vLLM).

Part 2 (`fix`): CPU cost of building the prompt of one call whose history holds H tokens
(1k .. 32k; Qwen3 template with tools, HF fast tokenizer), three ways: the plain template
(no fix), the peers' fix (render + tokenize the whole history twice), megagym's fix (render twice,
tokenize only the tail after the last assistant message). Prints ms per call and the ratio, and
megagym's fix without its match checks (tokens.py: token fields must match their messages) beside
it, so the last column is what the checks cost.

Part 3 (`seeds`): part 1's load against `megagym serve` with `request_seeds=true` (every request
sampled from its own derived seed: vLLM's per-request generators) and without, one at a time.
Prints the same table (seeded / plain): what repeatable sampling costs on CPU.

    .venv/bin/python bench/serve_overhead.py                  # all three parts, defaults below
    .venv/bin/python bench/serve_overhead.py fix              # only the fix cost
    .venv/bin/python bench/serve_overhead.py fix --cpu-time   # the same, timed in CPU time (shared machine)
    .venv/bin/python bench/serve_overhead.py serve --conversations 64 --turns 8 --max-tokens 16
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "search", "description": "Search the web.",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}},
]


# -- part 1: serving ------------------------------------------------------------------------------


async def conversation(client, model, turns, max_tokens, latencies, errors, cid):
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": f"Conversation {cid}: what is the weather in Paris?"}]
    for turn in range(turns):
        body = {"model": model, "messages": messages, "tools": TOOLS, "max_tokens": max_tokens,
                "temperature": 1.0, "top_p": 1.0, "logprobs": True, "top_logprobs": 0,
                "return_tokens_as_token_ids": True}
        t0 = time.perf_counter()
        r = await client.post("/v1/chat/completions", json=body)
        latencies.append(time.perf_counter() - t0)
        if r.status_code != 200:
            errors.append(r.text[:300])
            return
        msg = r.json()["choices"][0]["message"]
        hist = {"role": "assistant", "content": msg.get("content") or ""}
        for f in ("prompt_token_ids", "generation_token_ids", "generation_log_probs"):
            if f in msg:
                hist[f] = msg[f]
        messages += [hist, {"role": "user", "content": f"Thanks. Turn {turn + 1}: and tomorrow?"}]


def cpu_seconds(pid):
    """CPU time (user+sys, all threads) of `pid` and, separately, of all its descendants."""
    import os

    tick = os.sysconf("SC_CLK_TCK")
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                stats[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
            except (OSError, IndexError, ValueError):
                pass
    own = stats.get(pid, (0, 0.0))[1]
    kids, frontier = 0.0, [pid]
    while frontier:
        parent = frontier.pop()
        for p, (ppid, cpu) in stats.items():
            if ppid == parent:
                kids += cpu
                frontier.append(p)
    return own, kids


async def drive(base_url, model, conversations, turns, max_tokens, pid):
    import httpx

    limits = httpx.Limits(max_connections=conversations + 4, max_keepalive_connections=conversations + 4)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:
        # warm-up (the first CPU request compiles / allocates for ~20 s)
        await asyncio.gather(*(conversation(client, model, 1, 4, [], [], -i) for i in range(4)))
        latencies, errors = [], []
        cpu0 = cpu_seconds(pid)
        t0 = time.perf_counter()
        await asyncio.gather(*(conversation(client, model, turns, max_tokens, latencies, errors, i)
                               for i in range(conversations)))
        wall = time.perf_counter() - t0
        cpu1 = cpu_seconds(pid)
    return latencies, errors, wall, (cpu1[0] - cpu0[0], cpu1[1] - cpu0[1])


def pct(values, p):
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def run_serve(args, model_dir, pair=("megagym", "vLLM")):
    """The same load against two servers, one at a time; prints them side by side (first / second)."""
    from megagym.server.process import ServerProcess, free_port

    megagym = ["dtype=float32", f"max_model_len={args.max_model_len}", "kv_cache_gib=1"]
    results = {}
    for name in (pair[::-1] if args.vllm_first else pair):
        port = free_port()
        if name == "vLLM":  # the same 1 GiB KV cache as megagym's kv_cache_gib=1 (else vLLM wants 92% of RAM free)
            srv = ServerProcess(str(model_dir), port=port, env={"VLLM_CPU_KVCACHE_SPACE": "1"}, command=[
                sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                "--dtype", "float32", "--max-model-len", str(args.max_model_len), "--enforce-eager",
                "--host", "127.0.0.1", "--port", str(port), "--enable-auto-tool-choice",
                "--tool-call-parser", "hermes", "--disable-log-stats"])
        else:
            srv = ServerProcess(str(model_dir), port=port,
                                overrides=megagym + (["request_seeds=true"] if name == "seeded" else []))
        print(f"[{name}] starting ...", flush=True)
        with srv:
            lat, errors, wall, (api_cpu, engine_cpu) = asyncio.run(drive(
                srv.base_url, str(model_dir), args.conversations, args.turns, args.max_tokens, srv.proc.pid))
        if errors:
            print(f"[{name}] {len(errors)} errors, first: {errors[0]}", flush=True)
        results[name] = dict(n=len(lat), rps=len(lat) / wall, p50=pct(lat, 50), p99=pct(lat, 99),
                             mean=statistics.mean(lat), errors=len(errors), wall=wall,
                             api_ms=1000 * api_cpu / max(1, len(lat)), engine_ms=1000 * engine_cpu / max(1, len(lat)))
        print(f"[{name}] {results[name]}", flush=True)
    a, b = (results[k] for k in pair)
    print(f"\nserving: {args.conversations} concurrent conversations x {args.turns} turns, "
          f"{args.max_tokens} new tokens per call, tiny Qwen3 fp32 on CPU")
    print(f"{'':18}{pair[0]:>10}{pair[1]:>10}{'ratio':>10}")
    rows = [("requests/s", "rps", "{:10.2f}"), ("p50 (s)", "p50", "{:10.3f}"), ("p99 (s)", "p99", "{:10.3f}"),
            ("API CPU ms/req", "api_ms", "{:10.1f}"), ("engine CPU ms/req", "engine_ms", "{:10.1f}")]
    for label, key, fmt in rows:
        print(f"{label:18}{fmt.format(a[key])}{fmt.format(b[key])}{a[key] / b[key]:10.2f}")
    print(f"{'errors':18}{a['errors']:10d}{b['errors']:10d}")
    print("(API: the HTTP server process: parsing, template, tokenizer, detokenizer, parsers; "
          "engine: EngineCore / worker processes)")
    return results


# -- part 2: the fix ------------------------------------------------------------------------------


def history_of(chat, target_tokens, rng):
    """A tool-using conversation whose rendered history holds about `target_tokens` tokens."""
    words = ["weather", " Skinny", " Paris", " sunny", " 42", "温度", " the", " forecast", " is", "\n"]
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Plan my week."}]
    prompt = chat.prompt_ids(messages, tools=TOOLS).token_ids
    while True:
        text = "".join(rng.choice(words) for _ in range(120))
        # the model's own tokens: text, then the tool call the parser extracted from them
        call_text = '\n<tool_call>\n{"name": "search", "arguments": {"query": "x"}}\n</tool_call>'
        gen = chat.encode(text + call_text) + [chat.turn_end_id]
        call = {"id": f"c{len(messages)}", "type": "function",
                "function": {"name": "search", "arguments": '{"query": "x"}'}}
        messages.append({"role": "assistant", "content": text, "tool_calls": [call], "prompt_token_ids": prompt,
                         "generation_token_ids": gen, "generation_log_probs": [-1.0] * len(gen)})
        messages.append({"role": "tool", "tool_call_id": call["id"], "content": "result " * 40})
        p = chat.prompt_ids(messages, tools=TOOLS).token_ids
        if len(p) >= target_tokens:
            return messages, len(p)
        prompt = p


def run_fix(args):
    import random

    from transformers import AutoTokenizer

    from megagym.server.tokens import ChatTokenizer, prompt_ids_reference, template_messages
    from megagym.testing.tiny_qwen3 import qwen3_tokenizer_dir

    tok = AutoTokenizer.from_pretrained(str(qwen3_tokenizer_dir()))
    chat = ChatTokenizer(tok)
    rng = random.Random(0)
    bare = ChatTokenizer(tok)  # the match checks (turn by turn, spliced message) switched off
    bare._check_turns = bare._check_spliced_message = lambda *a, **k: None

    def unchecked(messages):
        return bare.prompt_ids(messages, tools=TOOLS)

    clock = time.thread_time if args.cpu_time else time.perf_counter

    def timeit(fn, reps):
        fn()
        best = []
        for _ in range(reps):
            t0 = clock()
            fn()
            best.append(clock() - t0)
        return statistics.median(best) * 1000

    def paired(f, g, reps):
        """Medians of f and g timed alternately, so that load drifting on a shared machine hits both."""
        f(), g()
        tf, tg = [], []
        for _ in range(reps):
            for fn, out in ((f, tf), (g, tg)):
                t0 = clock()
                fn()
                out.append(clock() - t0)
        return statistics.median(tf) * 1000, statistics.median(tg) * 1000

    print("\non-policy fix cost per call vs history length (Qwen3 template with tools, HF fast tokenizer; "
          + ("CPU time of the calling thread)" if args.cpu_time else "wall-clock)"))
    print(f"{'history':>9}{'no fix':>10}{'peers':>10}{'megagym':>10}{'peers/megagym':>15}"
          f"{'unchecked':>11}{'checks':>9}")
    for target in args.history:
        messages, n = history_of(chat, target, rng)
        plain = lambda: chat.encode(chat.render(template_messages(messages), tools=TOOLS))  # noqa: E731
        peers = lambda: prompt_ids_reference(chat, messages, tools=TOOLS)  # noqa: E731
        ours = lambda: chat.prompt_ids(messages, tools=TOOLS)  # noqa: E731
        assert ours().token_ids == peers()
        reps = 15 if n < 10000 else 7
        a, b = timeit(plain, reps), timeit(peers, reps)
        c, d = paired(ours, lambda: unchecked(messages), 3 * reps)  # the same fix without the match checks
        print(f"{n:9d}{a:9.1f}ms{b:9.1f}ms{c:9.1f}ms{b / c:15.1f}{d:9.1f}ms{c - d:7.1f}ms", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", nargs="?", choices=["all", "serve", "fix", "seeds"], default="all")
    p.add_argument("--conversations", type=int, default=64)
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--vllm-first", action="store_true", help="run the second server of the pair first (order check)")
    p.add_argument("--history", type=int, nargs="*", default=[1000, 4000, 8000, 16000, 32000])
    p.add_argument("--cpu-time", action="store_true",
                   help="fix part: time the calling thread's CPU time (steadier than wall-clock on a shared machine)")
    args = p.parse_args(argv)
    if args.part in ("all", "fix"):
        run_fix(args)
    if args.part in ("all", "serve", "seeds"):
        from megagym.testing.tiny_qwen3 import write_tiny_qwen3

        with tempfile.TemporaryDirectory() as d:
            model = write_tiny_qwen3(Path(d) / "tiny", seed=0)
            if args.part in ("all", "serve"):
                run_serve(args, model)
            if args.part in ("all", "seeds"):
                run_serve(args, model, pair=("seeded", "megagym"))


if __name__ == "__main__":
    main()
