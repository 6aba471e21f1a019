"""The on-policy token-ID fix on the real Qwen3 tokenizer and template (no vLLM, no model)."""

from __future__ import annotations

import random

import pytest

from megagym.server.tokens import (
    ChatTokenizer,
    TokenFixError,
    find_prior_tokens,
    prompt_ids_reference,
)

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
SKI, NNY = [60495], [77, 3834]  # " Ski" + "n" + "ny": decodes to " Skinny", which re-tokenizes to [94224]


@pytest.fixture(scope="module")
def chat():
    from transformers import AutoTokenizer

    from megagym.testing.tiny_qwen3 import qwen3_tokenizer_dir

    tok = AutoTokenizer.from_pretrained(str(qwen3_tokenizer_dir()))
    return ChatTokenizer(tok, stop_ids=[tok.convert_tokens_to_ids("<|endoftext|>")])


def assistant(prev_prompt, gen, content, chat, **extra):
    return {
        "role": "assistant",
        "content": content,
        "prompt_token_ids": prev_prompt,
        "generation_token_ids": gen,
        "generation_log_probs": [-1.0] * len(gen),
        **extra,
    }


def test_first_turn_is_plain_template(chat):
    msgs = [{"role": "user", "content": "hi"}]
    p = chat.prompt_ids(msgs, tools=TOOLS)
    assert not p.spliced
    assert chat.decode(p.token_ids).endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_merged_tokens_kept_verbatim(chat):
    msgs = [{"role": "user", "content": "who?"}]
    p1 = chat.prompt_ids(msgs).token_ids
    gen = SKI + NNY + [chat.turn_end_id]
    msgs += [assistant(p1, gen, chat.decode(gen[:-1]), chat), {"role": "user", "content": "again"}]
    p2 = chat.prompt_ids(msgs)
    assert p2.spliced and p2.token_ids[: len(p1) + len(gen)] == p1 + gen
    # re-tokenizing the text would have merged the tokens: the fix is not a no-op here
    plain = chat.encode(chat.render(msgs))
    assert plain[: len(p1) + 1] == p1 + [94224]
    assert p2.token_ids == prompt_ids_reference(chat, msgs)


def test_think_stripped_history_and_max_tokens_without_eos(chat):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "weather?"}]
    p1 = chat.prompt_ids(msgs, tools=TOOLS).token_ids
    # call 1 reasons then calls a tool and stops with EOS
    text1 = '<think>\nhmm Skinny\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "SF"}}\n</tool_call>'
    gen1 = chat.encode(text1)[:5] + SKI + NNY + chat.encode(text1)[5:] + [chat.turn_end_id]
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"SF"}'}}
    msgs += [
        assistant(p1, gen1, "", chat, reasoning_content="hmm Skinny", tool_calls=[call]),
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    p2 = chat.prompt_ids(msgs, tools=TOOLS)
    assert p2.token_ids[: len(p1) + len(gen1)] == p1 + gen1
    assert p2.token_ids == prompt_ids_reference(chat, msgs, tools=TOOLS)
    # call 2 hits max_tokens (no EOS); then a new user turn makes Qwen3 strip <think> from history
    gen2 = chat.encode("<think>\nstill thinking about Ski") + NNY
    msgs += [assistant(p2.token_ids, gen2, "<think>\nstill thinking about Skinny", chat)]
    msgs += [{"role": "user", "content": "and tomorrow?"}]
    rendered = chat.render([{k: v for k, v in m.items() if "token" not in k and "log_probs" not in k} for m in msgs], tools=TOOLS)
    assert "hmm Skinny" not in rendered  # the template dropped the reasoning of history
    p3 = chat.prompt_ids(msgs, tools=TOOLS)
    prev = p2.token_ids + gen2
    assert p3.token_ids[: len(prev)] == prev
    assert p3.token_ids[len(prev)] == chat.turn_end_id  # the template's turn end closes the cut-off turn
    assert p3.token_ids == prompt_ids_reference(chat, msgs, tools=TOOLS)


def test_random_conversations_match_reference(chat):
    rng = random.Random(0)
    vocab = list(range(200, 150000))
    for trial in range(20):
        msgs = [{"role": "user", "content": f"question {trial}"}]
        prompt = chat.prompt_ids(msgs, tools=TOOLS).token_ids
        for turn in range(5):
            gen = [rng.choice(vocab) for _ in range(rng.randint(1, 12))]
            if rng.random() < 0.6:
                gen.append(chat.turn_end_id)
            text = chat.decode([t for t in gen if t != chat.turn_end_id])
            msgs.append(assistant(prompt, gen, text, chat))
            msgs.append(rng.choice([{"role": "user", "content": "more"}, {"role": "tool", "tool_call_id": "x", "content": "42"}]))
            p = chat.prompt_ids(msgs, tools=TOOLS)
            assert p.token_ids[: len(prompt) + len(gen)] == prompt + gen
            assert p.token_ids == prompt_ids_reference(chat, msgs, tools=TOOLS)
            prompt = p.token_ids


def test_other_stop_token_is_kept(chat):
    msgs = [{"role": "user", "content": "q"}]
    p1 = chat.prompt_ids(msgs).token_ids
    eot = chat.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    gen = chat.encode("ok") + [eot]
    msgs += [assistant(p1, gen, "ok", chat), {"role": "user", "content": "next"}]
    p2 = chat.prompt_ids(msgs).token_ids
    assert p2[: len(p1) + len(gen)] == p1 + gen
    assert chat.decode(p2[len(p1) + len(gen) :]).startswith("\n<|im_start|>user\nnext")


def test_only_last_assistant_with_fields_is_used(chat):
    msgs = [{"role": "user", "content": "q"}]
    p1 = chat.prompt_ids(msgs).token_ids
    gen1 = chat.encode("a") + [chat.turn_end_id]
    msgs += [assistant(p1, gen1, "a", chat), {"role": "user", "content": "q2"}]
    p2 = chat.prompt_ids(msgs).token_ids
    gen2 = SKI + NNY + [chat.turn_end_id]
    msgs += [assistant(p2, gen2, "Skinny", chat), {"role": "user", "content": "q3"}]
    # corrupt the older message's fields: they must be ignored
    msgs[1]["prompt_token_ids"] = [1, 2, 3]
    p3 = chat.prompt_ids(msgs).token_ids
    assert p3[: len(p2) + len(gen2)] == p2 + gen2


@pytest.mark.parametrize(
    "mutate, expect",
    [
        (lambda m: m[1].pop("generation_log_probs"), "missing generation_log_probs"),
        (lambda m: m[1].update(generation_token_ids="abc"), "messages[1].generation_token_ids must be a list"),
        (lambda m: m[1].update(generation_log_probs=[0.0]), "as long as generation_token_ids"),
        (lambda m: m[0].update(prompt_token_ids=[1]), "only allowed on assistant"),
        (lambda m: m[1].update(prompt_token_ids=[151645, 151645, 1]), "do not belong to this history"),
    ],
)
def test_errors_name_the_field(chat, mutate, expect):
    msgs = [{"role": "user", "content": "q"}]
    p1 = chat.prompt_ids(msgs).token_ids
    gen = chat.encode("answer") + [chat.turn_end_id]
    msgs += [assistant(p1, gen, "answer", chat), {"role": "user", "content": "again"}]
    mutate(msgs)
    with pytest.raises(TokenFixError) as e:
        chat.prompt_ids(msgs)
    assert expect in str(e.value)


def test_mismatch_error_shows_both_strings(chat):
    msgs = [{"role": "user", "content": "q"}]
    gen = chat.encode("answer") + [chat.turn_end_id]
    bogus_prompt = chat.encode("<|im_start|>user\nq<|im_end|>\n<|im_start|>user\nextra<|im_end|>\n<|im_start|>assistant\n")
    msgs += [assistant(bogus_prompt, gen, "answer", chat), {"role": "user", "content": "again"}]
    with pytest.raises(TokenFixError) as e:
        chat.prompt_ids(msgs)
    msg = str(e.value)
    assert "model prefix (decoded)" in msg and "template prefix (decoded)" in msg and "extra" in msg


def test_find_prior_tokens_none(chat):
    assert find_prior_tokens([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]) is None


# -- token fields must match their messages (tokens.py's definition of "match") -------------------


def two_turns(chat, tools=None, system="be brief", user="weather?"):
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    p1 = chat.prompt_ids(msgs, tools=tools).token_ids
    gen = chat.encode("Let me check.") + [chat.turn_end_id]
    return msgs + [assistant(p1, gen, "Let me check.", chat), {"role": "user", "content": "and Lyon?"}]


@pytest.mark.parametrize(
    "mutate, expect",
    [
        (lambda m, c: m[0].update(content="be verbose"), "turn 0 (not an assistant turn) differs"),
        (lambda m, c: m[1].update(content="weather in Paris?"), "turn 1 (not an assistant turn) differs"),
        (lambda m, c: m[2].update(content="I will not check."), "messages[2].content: this text is not in the decoded"),
        (lambda m, c: m[2].update(reasoning_content="secret plan"), "messages[2].reasoning_content"),
        (lambda m, c: m[2].update(tool_calls=[{"id": "x", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]),
         "messages[2].tool_calls.function.name"),
        # the ids of another conversation with the same shape
        (lambda m, c: m[2].update(prompt_token_ids=two_turns(c, user="what time is it?")[2]["prompt_token_ids"]),
         "turn 1 (not an assistant turn) differs"),
    ],
)
def test_fields_must_match_their_messages(chat, mutate, expect):
    msgs = two_turns(chat)
    assert chat.prompt_ids(msgs).spliced  # unchanged: accepted
    mutate(msgs, chat)
    with pytest.raises(TokenFixError) as e:
        chat.prompt_ids(msgs)
    assert expect in str(e.value)
    assert "from the token fields (decoded)" in str(e.value)


def test_tools_added_after_the_call_are_refused(chat):
    msgs = two_turns(chat)  # the call was made without tools
    with pytest.raises(TokenFixError, match="turn 0 .not an assistant turn. differs") as e:
        chat.prompt_ids(msgs, tools=TOOLS)
    assert "# Tools" in str(e.value)  # the rendered side shows the tool spec the ids lack
    assert chat.prompt_ids(two_turns(chat, tools=TOOLS), tools=TOOLS).spliced  # same tools on both calls: fine


@pytest.mark.parametrize(
    "field, value, expect",
    [
        ("generation_token_ids", [-1], "id -1 is outside the vocabulary"),
        ("generation_token_ids", [2**70], "outside the vocabulary"),
        ("prompt_token_ids", [151645, 10**9], "outside the vocabulary"),  # turn count differs too
        ("generation_token_ids", [True], "must be a list of integer token ids"),
        ("generation_log_probs", [float("nan")] * 4, "finite"),
        ("generation_log_probs", ["x"] * 4, "finite"),
    ],
)
def test_token_fields_checked_before_use(chat, field, value, expect):
    msgs = two_turns(chat)
    if field == "generation_log_probs":
        value = value[:1] * len(msgs[2]["generation_token_ids"])
    elif field == "generation_token_ids":
        msgs[2]["generation_log_probs"] = [-1.0] * len(value)
    msgs[2][field] = value
    with pytest.raises(TokenFixError, match=expect):
        chat.prompt_ids(msgs)


def test_memoized_sandbox_refuses_what_jinja_refuses(chat):
    """The render speed-up caches the sandbox's attribute checks per (type, name): the answers stay
    jinja's own, a template that reaches for internals still fails, and renders are unchanged."""
    import jinja2.sandbox
    from transformers.utils.chat_template_utils import _compile_jinja_template

    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]
    before = chat.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert chat.render(msgs) == before
    env = _compile_jinja_template(chat.tokenizer.get_chat_template()).environment
    reference = jinja2.sandbox.ImmutableSandboxedEnvironment()
    for obj, attr in [("x", "split"), ("x", "__class__"), ([], "append"), ({}, "get"), ({}, "update"),
                      (len, "__globals__"), (str, "mro"), ("x", "format")]:
        assert env.is_safe_attribute(obj, attr, None) == reference.is_safe_attribute(obj, attr, None), (obj, attr)
        assert env.is_safe_attribute(obj, attr, None) == reference.is_safe_attribute(obj, attr, None)  # cached
    evil = "{{ messages[0].content.__class__.__mro__ }}"
    with pytest.raises(TokenFixError, match="SecurityError|UndefinedError|unsafe"):
        ChatTokenizer(chat.tokenizer, chat_template=evil).render(msgs)
    assert chat.render(msgs) == before
