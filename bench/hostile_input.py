"""Hostile-input run against `megagym serve`: several hundred malformed, hostile and faulty requests.

Starts the policy server as a training run does (ServerProcess, the tiny random Qwen3, an API key,
weight_sync=shm), then sends, eight at a time, requests of these classes and tabulates the answers:

  unauthenticated   no / wrong bearer key on every endpoint, /weights/* included
  json              invalid JSON, deep nesting, NaN, lone UTF-16 surrogates, wrong content type
  schema            wrong types and shapes of every known field, malformed tools and tool calls
  sampling          fields that change or misstate the sampled distribution (guided decoding,
                    best_of, beam search, penalties, ...), empty stop strings, out-of-range seeds
  token_fields      out-of-vocabulary ids, NaN / string logprobs, changed system prompt, added
                    tools, edited assistant message, ids of another conversation
  tokenize          the same on /tokenize
  weights           garbage bodies to /weights/start, /update and /finish during an update
  random            seeded random mutations of a valid request (one field replaced by junk)
  oversized         20 MB bodies (declared and chunked), too many messages, too much text; the API
                    process's RSS is read before and after, and its peak (VmHWM)
  slow              idle connection, partial headers, partial body (closed by the server's deadlines)
  valid             well-formed requests interleaved with the rest (must all answer 200)

Done when: 0 x 5xx, 0 requests over 30 s, the engine still answers a seeded reference request
exactly as before the run and within 1e-4 of a transformers forward, the weights unchanged
(/weights/info: version 0, consistent), and the API key on no command line and in no log.

    .venv/bin/python bench/hostile_input.py              # ~500 requests
    .venv/bin/python bench/hostile_input.py --random 400  # more random mutations
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import random
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KEY = "hostile-bench-key-7f3a"
USER = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}
REFERENCE = {"messages": [{"role": "user", "content": "reference prompt"}], "max_tokens": 8, "seed": 11,
             "logprobs": True, "return_tokens_as_token_ids": True}
JUNK = [None, True, -1, 0, 2**64, -(2**70), 1.5, 1e308, "", "x" * 300, "\u0000", [], [1, "a"], {}, {"a": {"b": []}},
        [[[[[]]]]], "NaN", -0.0]
Case = collections.namedtuple("Case", "klass method path body headers raw")


def case(klass, body=None, path="/v1/chat/completions", method="POST", headers=None, raw=None, auth=True):
    h = {"authorization": f"Bearer {KEY}"} if auth else {}
    h.update(headers or {})
    return Case(klass, method, path, body, h, raw)


def nested(depth):
    return ('{"messages": [{"role": "user", "content": "x"}], "metadata": ' + "[" * depth + "]" * depth + "}").encode()


def build_cases(history, other_history, n_random, rng):
    cases = []
    endpoints = [("POST", "/v1/chat/completions"), ("POST", "/tokenize"), ("GET", "/v1/models"),
                 ("POST", "/weights/init"), ("POST", "/weights/start"), ("POST", "/weights/update"),
                 ("POST", "/weights/finish"), ("POST", "/weights/abort"), ("GET", "/weights/info")]
    for method, path in endpoints:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": KEY}, {"authorization": "Basic x"}):
            cases.append(Case("unauthenticated", method, path, {"messages": USER}, headers, None))
    raw = [b"{not json", b"[1, 2]", b"", b"null", b"\xff\xfe", nested(40), nested(100_000),
           b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
           b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": Infinity}',
           b'{"messages": [{"role": "user", "content": "x"}], "stop": "\\ud800"}',
           b'{"messages": [{"role": "user", "content": "a\\udfffb"}]}',
           b'{"messages": [{"role": "system", "content": "\\ud83d"}, {"role": "user", "content": "x"}]}',
           b'{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "\\udc00"}}]}',
           b'{"messages": [{"role": "user", "content": "x"}], "metadata": {"\\ud800": 1}}',
           b'{"messages": [{"role": "user", "content": "x"}], "n": 1' + b"0" * 5000 + b"}"]
    for body in raw:
        for path in ("/v1/chat/completions", "/tokenize"):
            cases.append(case("json", raw=body, path=path, headers={"content-type": "application/json"}))
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        cases.append(case("json", raw=json.dumps({"messages": USER}).encode(), headers={"content-type": kind}))
    fields = ["messages", "model", "tools", "tool_choice", "temperature", "top_p", "n", "stop", "seed", "max_tokens",
              "logprobs", "top_logprobs", "chat_template_kwargs", "required_prefix_token_ids", "stream",
              "add_generation_prompt", "parallel_tool_calls", "metadata"]
    for field in fields:
        for junk in rng.sample(JUNK, 6):
            body = {"messages": USER, "max_tokens": 2, field: junk}
            cases.append(case("schema", body))
    for msg_field in ("role", "content", "name", "tool_calls", "tool_call_id", "reasoning_content"):
        for junk in rng.sample(JUNK, 4):
            cases.append(case("schema", {"messages": [{"role": "user", "content": "x", msg_field: junk}], "max_tokens": 2}))
    for tools in ([{"type": "code_interpreter"}], [{"type": "function"}], [{"type": "function", "function": {"name": ""}}],
                  [{"type": "function", "function": {"name": "f", "parameters": "x"}}], [TOOL, 5], "tools"):
        cases.append(case("schema", {"messages": USER, "tools": tools, "max_tokens": 2}))
    sampling = {"response_format": {"type": "json_object"}, "guided_json": {"type": "object"}, "guided_regex": "a+",
                "guided_choice": ["a", "b"], "guided_grammar": "root ::= 'a'", "structured_outputs": {"regex": "a"},
                "bad_words": ["the"], "allowed_token_ids": [1, 2], "best_of": 4, "use_beam_search": True,
                "length_penalty": 2.0, "stop_token_ids": [5], "logits_processors": ["x"], "top_k": 5, "min_p": 0.1,
                "presence_penalty": 1.0, "frequency_penalty": 1.0, "repetition_penalty": 1.2, "min_tokens": 3,
                "ignore_eos": True, "logit_bias": {"5": 50}, "temperature": 0.3, "top_p": 0.5, "stop": "",
                "seed": 2**64, "echo": True, "chat_template": "{{ 'pwned' }}", "prompt_logprobs": 1,
                "tool_choice": "required", "continue_final_message": True, "skip_special_tokens": False,
                "vllm_xargs": {"a": 1}, "priority": -10, "stream": True}
    for field, value in sampling.items():
        cases.append(case("sampling", {"messages": USER, "max_tokens": 2, field: value}))
    cases.append(case("sampling", {"messages": USER, "stop": ["a", ""]}))
    cases.append(case("sampling", {"messages": USER, "stop": ["s"] * 100}))
    cases.append(case("sampling", {"messages": USER, "seed": -(2**63) - 1}))
    for path in ("/v1/chat/completions", "/tokenize"):
        klass = "token_fields" if path.startswith("/v1") else "tokenize"
        for mutate in token_field_mutations(other_history):
            msgs = copy.deepcopy(history)
            body = {"messages": msgs, "max_tokens": 2}
            mutate(body)
            cases.append(case(klass, body, path=path))
    for prompt in ("", "x", "\u0000", "a" * 1000):
        cases.append(case("tokenize", {"prompt": prompt, "add_special_tokens": "yes"}, path="/tokenize"))
    cases += [case("tokenize", {"prompt": "x", "extra": 1}, path="/tokenize"),
              case("tokenize", {"prompt": 5}, path="/tokenize"),
              case("tokenize", {"messages": USER, "tools": [{"type": "function", "function": {"name": "\t"}}]}, path="/tokenize")]
    for _ in range(n_random):
        body = {"messages": copy.deepcopy(history), "max_tokens": 2}
        where = rng.random()
        if where < 0.4:
            body[rng.choice(fields + ["guided_json", "bad_words", "best_of", "junk_field"])] = rng.choice(JUNK)
        elif where < 0.8:
            m = rng.choice(body["messages"])
            m[rng.choice(["role", "content", "prompt_token_ids", "generation_token_ids", "generation_log_probs",
                          "tool_calls", "name"])] = rng.choice(JUNK)
        else:
            body["messages"][0]["content"] = "".join(chr(rng.randrange(1, 0x2FFFF)) for _ in range(40))
        if isinstance(body.get("max_tokens"), int) and not isinstance(body["max_tokens"], bool) and body["max_tokens"] > 4:
            body["max_tokens"] = 4
        if body.get("max_tokens") is None:
            body["max_completion_tokens"] = 2
        if isinstance(body.get("n"), int) and not isinstance(body["n"], bool) and body["n"] > 2:
            body["n"] = 2
        cases.append(case("random", body, path=rng.choice(["/v1/chat/completions", "/v1/chat/completions", "/tokenize"])))
    return cases


def token_field_mutations(other_history):
    a = 2  # the assistant message with token fields

    def setf(field, value):
        return lambda b: b["messages"][a].update({field: value})

    def both(gen):
        return lambda b: b["messages"][a].update(generation_token_ids=gen, generation_log_probs=[0.0] * len(gen))

    return [
        both([-1]), both([2**70]), both([10**9]), both([True]), both(["1"]),
        setf("prompt_token_ids", [151645, -5]), setf("prompt_token_ids", []), setf("prompt_token_ids", "abc"),
        lambda b: b["messages"][a].update(prompt_token_ids=[-1, 151645], generation_token_ids=[2**70],
                                          generation_log_probs=[0.0]),  # OOV with a turn-count mismatch
        setf("generation_log_probs", None), setf("generation_log_probs", "x"),
        lambda b: b["messages"][a].update(generation_log_probs=[float("nan")] * len(b["messages"][a]["generation_token_ids"])),
        lambda b: b["messages"][a].update(generation_log_probs=["x"] * len(b["messages"][a]["generation_token_ids"])),
        lambda b: b["messages"][a].update(generation_log_probs=[1e400] * len(b["messages"][a]["generation_token_ids"])),
        lambda b: b["messages"][a].pop("generation_log_probs"),
        lambda b: b["messages"][0].update(content="a changed system prompt"),
        lambda b: b["messages"][1].update(content="an edited user message"),
        lambda b: b.update(tools=[TOOL]),
        lambda b: b["messages"][a].update(content="an edited assistant message"),
        lambda b: b["messages"][a].update(tool_calls=[{"type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]),
        lambda b: b["messages"][a].update(prompt_token_ids=other_history[a]["prompt_token_ids"]),
        lambda b: b["messages"].insert(1, {"role": "user", "content": "inserted"}),
        lambda b: b["messages"].pop(1),
        lambda b: b["messages"][1].update(prompt_token_ids=[1, 2]),  # token fields on a user message
        lambda b: b.update(required_prefix_token_ids=[1, 2, 3]),
        lambda b: b.update(required_prefix_token_ids=[-1]),
    ]


def weight_cases():
    """(route, raw body) in order: garbage to start, then a real start and garbage during the update."""
    out = [("start", b"garbage"), ("start", b"[]"), ("start", b'{"pause_mode": "later"}'), ("start", b'{"pause_mode": 1}'),
           ("start", b'{"pause_mode": "wait", "x": 1}'), ("init", b'{"init_info": 5}'), ("finish", b"{}"),
           ("update", b'{"update_info": {}}')]
    for route, body in (("update", b"garbage"), ("update", b'{"update_info": 3}'), ("update", b"{}"),
                        ("update", b'{"update_info": [1]}'), ("finish", b'{"weight_version": "x"}'),
                        ("update", b'{"update_info": {"names": ["nope"], "dtype_names": ["float32"], "shapes": [[1]]}}')):
        out += [("start", b'{"pause_mode": "wait"}'), (route, body)]
    return out


def send(client, c: Case):
    t0 = time.monotonic()
    try:
        if c.raw is not None:
            r = client.request(c.method, c.path, content=c.raw, headers=c.headers)
        elif c.method == "GET":
            r = client.get(c.path, headers=c.headers)
        else:  # json.dumps, not httpx's encoder: NaN / Infinity must reach the server as written
            r = client.request(c.method, c.path, content=json.dumps(c.body).encode(),
                               headers={"content-type": "application/json", **c.headers})
        status, text = r.status_code, r.text[:300]
    except httpx.HTTPError as e:
        status, text = -1, f"{type(e).__name__}: {e}"
    return c.klass, status, time.monotonic() - t0, text, c


def rss(pid):
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS", "VmHWM")):
            key, value = line.split(":")
            fields[key] = int(value.split()[0]) / 1024
    return fields


def raw_request(port, head: bytes, body_iter, read_timeout=60.0):
    """Send a request on a raw socket while reading the answer (the client never buffers the body);
    return (status line, seconds until the status line arrived)."""
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as s:
        s.sendall(head)

        def feed():
            try:
                for chunk in body_iter:
                    s.sendall(chunk)
            except OSError:  # the server answered and we closed, or it closed
                pass

        sender = threading.Thread(target=feed, daemon=True)
        sender.start()
        data = b""
        try:
            while b"\r\n" not in data:
                more = s.recv(4096)
                if not more:
                    break
                data += more
        except OSError:
            pass
        took = time.monotonic() - t0
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    sender.join(10)
    return data.split(b"\r\n", 1)[0].decode(errors="replace"), took


def oversized(port, pid):
    mb20 = 20 * 1024 * 1024
    auth = f"Authorization: Bearer {KEY}\r\n".encode()
    results, before = [], rss(pid)
    declared = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + auth
                + b"Content-Length: %d\r\n\r\n" % mb20)
    chunked = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + auth
               + b"Transfer-Encoding: chunked\r\n\r\n")
    piece = b'{"messages": [{"role": "user", "content": "' + b"word " * 13000

    def body(n):
        yield piece
        for _ in range(n):
            yield b"word " * 13107

    def chunks(n):
        for part in body(n):
            yield b"%x\r\n%s\r\n" % (len(part), part)
        yield b"0\r\n\r\n"

    for name, head, it in (("20 MB declared", declared, body(mb20 // 65535)),
                           ("20 MB chunked", chunked, chunks(mb20 // 65535))):
        status, took = raw_request(port, head, it)
        results.append(("oversized", name, status, took))
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60, headers={"authorization": f"Bearer {KEY}"}) as c:
        limits = c.get("/health").json()["limits"]
        for name, payload in (
                ("too many messages", {"messages": [{"role": "user", "content": "x"}] * (limits["max_messages"] + 1)}),
                ("text over max_text_chars", {"messages": [{"role": "user", "content": "word " * (limits["max_text_chars"] // 5 + 1)}]}),
                ("prompt over context", {"messages": [{"role": "user", "content": "word " * 5000}]}),
                ("/tokenize text over limit", {"prompt": "x" * (limits["max_text_chars"] + 1)})):
            t0 = time.monotonic()
            r = c.post("/tokenize" if "tokenize" in name else "/v1/chat/completions", json=payload)
            results.append(("oversized", name, f"HTTP/1.1 {r.status_code}", time.monotonic() - t0))
    return results, before, rss(pid)


def slow(port):
    """Stalled connections: each must be closed by the server (header / body deadlines)."""
    def one(name, data):
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
            if data:
                s.sendall(data)
            out = b""
            try:
                while True:
                    more = s.recv(4096)
                    if not more:
                        break
                    out += more
            except OSError:
                pass
        return ("slow", name, out.split(b"\r\n", 1)[0].decode(errors="replace") or "closed", time.monotonic() - t0)

    jobs = [("idle connection", b""), ("partial headers", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Ty"),
            ("partial body", b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 1000\r\n\r\n{\"prompt\": \"x")]
    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(lambda j: one(*j), jobs))


def hf_logprobs(model_dir, prompt, gen):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + gen])).logits[0]
    logp = torch.log_softmax(logits, dim=-1)
    return [logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(gen)]


def build_history(client):
    """A real two-call history (system, user, assistant with token fields, user)."""
    first = client.post("/v1/chat/completions", json={
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "weather?"}],
        "max_tokens": 4}).json()["choices"][0]["message"]
    hist = {"role": "assistant", "content": first["content"] or ""}
    hist.update({f: first[f] for f in ("prompt_token_ids", "generation_token_ids", "generation_log_probs")})
    return [{"role": "system", "content": "be brief"}, {"role": "user", "content": "weather?"}, hist,
            {"role": "user", "content": "and Lyon?"}]


def main(argv=None):
    from megagym.server.process import ServerProcess
    from megagym.testing.tiny_qwen3 import write_tiny_qwen3

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--random", type=int, default=150, help="random mutations of a valid request")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        model = write_tiny_qwen3(Path(tmp) / "tiny", seed=0)
        server = ServerProcess(str(model), overrides=["max_model_len=4096", "weight_sync=shm", f"api_key={KEY}"],
                               log_path=Path(tmp) / "serve.log")
        server.start(timeout_s=600)
        try:
            report = run(server, args, rng, str(model))
        finally:
            server.stop()
            log = Path(tmp, "serve.log").read_text(errors="replace")
        report["key_in_log"] = KEY in log
    print_report(report)
    return 0 if report["ok"] else 1


def run(server, args, rng, model_dir):
    pid, port = server.proc.pid, server.port
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    auth = {"authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=server.base_url, timeout=120, headers=auth) as client:
        health = client.get("/health").json()
        reference = client.post("/v1/chat/completions", json=REFERENCE).json()["choices"][0]["message"]
        history = build_history(client)
        other = build_history(client)
        other[0]["content"] = "be long"  # another conversation's ids: same shape, another system prompt
        other_first = client.post("/tokenize", json={"messages": other[:2]}).json()["tokens"]
        other[2]["prompt_token_ids"] = other_first
        cases = build_cases(history, other, args.random, rng)
        valid = [case("valid", {"messages": USER, "max_tokens": 2}), case("valid", {"messages": history, "max_tokens": 2}),
                 case("valid", {"messages": history}, path="/tokenize"), case("valid", None, path="/v1/models", method="GET")]
        for i in range(0, len(cases), 12):  # interleave well-formed requests
            cases.insert(i, valid[(i // 12) % len(valid)])
        t0 = time.monotonic()
        results = []
        slow_box = []
        slow_thread = threading.Thread(target=lambda: slow_box.extend(slow(port)))
        slow_thread.start()  # the stalled connections run beside everything else
        with httpx.Client(base_url=server.base_url, timeout=120) as raw_client:
            with ThreadPoolExecutor(args.concurrency) as pool:
                results += list(pool.map(lambda c: send(raw_client, c), cases))
            for route, body in weight_cases():
                results.append(send(raw_client, case("weights", raw=body, path=f"/weights/{route}",
                                                     headers={"content-type": "application/json"})))
        big, mem_before, mem_after = oversized(port, pid)
        slow_thread.join()
        elapsed = time.monotonic() - t0
        after = client.post("/v1/chat/completions", json=REFERENCE).json()["choices"][0]["message"]
        info = client.get("/weights/info").json()
        health_after = client.get("/health").json()
    hf = hf_logprobs(model_dir, after["prompt_token_ids"], after["generation_token_ids"])
    rows = [(k, s, t, txt) for k, s, t, txt, _ in results]
    rows += [(k, int(st.split()[1]) if st.startswith("HTTP/") else -1, t, name) for k, name, st, t in big + slow_box]
    failures = [(k, s, txt) for k, s, t, txt in rows if s >= 500 or s < 0 and k != "slow"]
    wrong_valid = [(s, txt) for k, s, t, txt in rows if k == "valid" and s != 200]
    slow_over = [t for k, s, t, txt in rows if t > 30]
    same = (after["generation_token_ids"] == reference["generation_token_ids"]
            and max(abs(a - b) for a, b in zip(after["generation_log_probs"], reference["generation_log_probs"])) <= 1e-6)
    parity = max(abs(a - b) for a, b in zip(hf, after["generation_log_probs"]))
    ok = (not failures and not wrong_valid and not slow_over and same and parity <= 1e-4 and info["weight_version"] == 0
          and info["consistent"] and not info["active"] and health_after["status"] == "ok" and KEY not in cmdline)
    return dict(rows=rows, failures=failures, wrong_valid=wrong_valid, elapsed=elapsed, mem_before=mem_before,
                mem_after=mem_after, big=big, slow=slow_box, same=same, parity=parity, info=info, health=health,
                key_in_cmdline=KEY in cmdline, ok=ok, slow_over=len(slow_over))


def print_report(r):
    by = collections.defaultdict(collections.Counter)
    worst = collections.defaultdict(float)
    for k, s, t, _ in r["rows"]:
        by[k][s] += 1
        worst[k] = max(worst[k], t)
    print(f"\nserver: dtype={r['health']['dtype']} limits={r['health']['limits']}")
    print(f"\n{'class':<16}{'requests':>9}{'4xx':>6}{'5xx':>6}{'other':>7}  {'slowest':>8}  statuses")
    total = collections.Counter()
    for k in sorted(by):
        c = by[k]
        n4 = sum(v for s, v in c.items() if 400 <= s < 500)
        n5 = sum(v for s, v in c.items() if s >= 500)
        total.update(c)
        print(f"{k:<16}{sum(c.values()):>9}{n4:>6}{n5:>6}{sum(c.values()) - n4 - n5:>7}  {worst[k]:7.2f}s  "
              + " ".join(f"{s}x{v}" for s, v in sorted(c.items())))
    n = sum(total.values())
    print(f"{'total':<16}{n:>9}{sum(v for s, v in total.items() if 400 <= s < 500):>6}"
          f"{sum(v for s, v in total.items() if s >= 500):>6}   in {r['elapsed']:.1f} s")
    print("\noversized and stalled requests:")
    for k, name, status, took in r["big"] + r["slow"]:
        print(f"  {name:<28}{status:<40}{took * 1000:9.0f} ms")
    mb, ma = r["mem_before"], r["mem_after"]
    print(f"\nAPI process memory: RSS {mb['VmRSS']:.0f} MB before the oversized requests, {ma['VmRSS']:.0f} MB after "
          f"(peak VmHWM {mb['VmHWM']:.0f} -> {ma['VmHWM']:.0f} MB)")
    print(f"requests over 30 s: {r['slow_over']}; 5xx or transport errors: {len(r['failures'])}; "
          f"valid requests not 200: {len(r['wrong_valid'])}")
    print(f"engine afterwards: seeded reference identical={r['same']}, max |engine - transformers| = {r['parity']:.2e}; "
          f"/weights/info {r['info']}")
    print(f"API key on the command line: {r['key_in_cmdline']}; in the server log: {r.get('key_in_log')}")
    for f in r["failures"][:10] + r["wrong_valid"][:10]:
        print("  FAIL", f)
    print("\nRESULT:", "PASS" if r["ok"] and not r.get("key_in_log") else "FAIL")


if __name__ == "__main__":
    sys.exit(main())
