"""End to end: training on an agent that does not carry token ids back, through Gym's token capture.

One Gym stack of its own (capture on) on the session's `megagym serve` (tiny random Qwen3):
- `pi_lowercase_words`: Gym's `pi_agent`, the third-party pi coding-agent CLI (Node, scripts/setup_pi.sh;
  without it only this test skips), whose /run answer is pi's own transcript with no token ids. Its
  samples come from Gym's capture and must match, call by call, what the policy server served (its
  token-version ledger is keyed by prompt + generated ids).
- `lowercase_words` and `example_multi_turn_gymnasium` with capture on: agents that echo the token
  fields, so one rollout yields both samples — from the echoed fields and, with those fields removed,
  from Gym's capture — which must be equal (token ids, loss mask, logprobs), also for multi-call rollouts.
- A capture Gym marks incomplete (a model call of the rollout that the policy server refused: Gym
  registered its intent and never got its tokens) is refused, never a partial sample.
Two quick tests without a stack: what compose writes, and the manager's capture keys and refusals
against Gym's real finalizer.
"""

from __future__ import annotations

import asyncio
import copy
import json

import httpx
import pytest

from megagym.gym import GymConfig, GymStack
from megagym.gym.config import REPO_ROOT
from megagym.gym.kill import marker_pids
from megagym.gym.rows import load_env_rows
from megagym.rollout import RolloutConfig, RolloutManager
from megagym.rollout.capture import ROLLOUT_ID_KEY, CaptureRefused, TokenCapture, new_rollout_id
from megagym.rollout.trajectory import trajectory_to_sample


PI = REPO_ROOT / ".venv-gym" / "pi" / "bin" / "pi"
TOKEN_FIELDS = ("prompt_token_ids", "generation_token_ids", "generation_log_probs")
CAPTURED = {  # echoing agents with capture on: inline copies of two catalog environments
    "lowercase_words_captured": "lowercase_words",
    "multi_turn_captured": "example_multi_turn_gymnasium",
}


def _catalog(name: str) -> dict:
    import yaml

    return yaml.safe_load((REPO_ROOT / "configs" / "gym" / "envs" / f"{name}.yaml").read_text())


def test_compose_turns_capture_on_only_for_capturing_agents(tmp_path):
    from megagym.gym.compose import compose

    cfg = GymConfig(environments=["pi_lowercase_words", "math_with_judge"])
    plan = compose(cfg, ["http://127.0.0.1:1/v1"], "tiny", run_dir=tmp_path, write=False)
    assert plan.capture_agents == ["pi_lowercase_words_agent"]
    assert plan.overrides["token_id_capture"] == {"enabled": True, "dir": str(tmp_path / "token_capture")}
    assert plan.overrides["pi_lowercase_words_agent"]["responses_api_agents"]["pi_agent"]["token_id_capture"]
    assert "math_with_judge_simple_agent" not in plan.overrides
    assert plan.env["PATH"].split(":")[0] == str(REPO_ROOT / ".venv-gym" / "pi" / "bin")
    plain = compose(GymConfig(environments=["math_with_judge"]), ["http://127.0.0.1:1/v1"], "tiny",
                    run_dir=tmp_path, write=False)
    assert plain.capture_agents == [] and "token_id_capture" not in plain.overrides and "PATH" not in plain.env


def test_manager_sends_a_new_capture_key_per_attempt_and_refuses_what_gym_masks(tmp_path):
    """Gym's real finalizer on an empty store: a token-less /run answer is refused, not sampled."""
    gym_python = REPO_ROOT / ".venv-gym" / "bin" / "python"
    if not gym_python.exists():
        pytest.skip("Gym's venv is missing: run `bash scripts/setup_gym.sh`")
    sent = []

    def handler(request: httpx.Request):
        rid = json.loads(request.content)[ROLLOUT_ID_KEY]
        sent.append(rid)
        if len(sent) <= 2:  # the first two attempts fail (then each rollout is retried under a new key)
            return httpx.Response(500, text="flaky")
        text = {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "hi"}]}
        return httpx.Response(200, json={"reward": 1.0, "response": {"output": [text]}})

    capture = TokenCapture(tmp_path / "token_capture", ["a"], gym_python, tmp_path / "finalizer.log")
    rc = RolloutConfig(n=2, max_concurrency=2, request_timeout_s=30, max_retries=1, backoff_s=0.01, progress=False)
    mgr = RolloutManager(rc, agents={"a": "http://agent-a"}, agent_to_env={"a": "env_a"},
                         transport=httpx.MockTransport(handler), capture=capture)
    try:
        [group] = mgr.collect([{"responses_create_params": {"input": "q"}, "agent_ref": {"name": "a"}}])
    finally:
        capture.close()
    assert len(sent) == 4 and len(set(sent)) == 4 and all(r.startswith("mg-") for r in sent)
    assert group.samples == [] and len(group.failures) == 2
    assert all("refused" in f and "capture contains no token records" in f for f in group.failures)


@pytest.fixture(scope="module")
def capture_stack(policy, tmp_path_factory):
    url, model = policy
    definitions = {name: {**_catalog(src), "token_capture": True} for name, src in CAPTURED.items()}
    envs = (["pi_lowercase_words"] if PI.exists() else []) + list(CAPTURED)
    cfg = GymConfig(environments=envs, definitions=definitions, start_timeout_s=420)
    stack = GymStack.start(cfg, [url], model, run_dir=tmp_path_factory.mktemp("gym_capture"))
    try:
        yield stack, cfg
    finally:
        left = stack.stop()
        assert not left and not marker_pids(stack.run_id), f"processes of the Gym stack left: {left}"


def _rows(cfg: GymConfig, env: str, agent: str, limit: int) -> list[dict]:
    rows = load_env_rows(GymConfig(environments=[env], definitions=cfg.definitions), "train", limit=limit)
    for row in rows:
        row["agent_ref"] = {"type": "responses_api_agents", "name": agent}
    return rows


def _calls(result: dict) -> list[dict]:
    return [item for item in result["response"]["output"] if item.get("generation_token_ids")]


def _strip_tokens(result: dict) -> dict:
    out = copy.deepcopy(result)
    for item in out["response"]["output"]:
        for key in TOKEN_FIELDS:
            item.pop(key, None)
    return out


@pytest.mark.gym
@pytest.mark.slow
def test_pi_agent_trains_through_capture(capture_stack, policy_server):
    stack, cfg = capture_stack
    if not PI.exists():
        pytest.skip(f"{PI} is missing: run `bash scripts/setup_pi.sh` (pi 0.80.2 on Node 22, from npm)")
    print(f"Gym stack with capture up in {stack.startup_s:.1f}s")
    rows = _rows(cfg, "pi_lowercase_words", "pi_lowercase_words_agent", limit=2)
    rcfg = RolloutConfig(n=2, max_output_tokens=32, max_concurrency=4, request_timeout_s=240, max_retries=0,
                         progress=False)
    mgr = RolloutManager(rcfg, stack, keep_results=True, policy_servers=[policy_server.base_url])
    assert mgr.capture is not None and mgr.capture.captures("pi_lowercase_words_agent")
    groups = mgr.collect(rows)
    mgr.capture.close()
    for g in groups:
        assert g.failures == [], f"row {g.row_index}: {g.failures}"
        assert len(g.samples) == rcfg.n and g.env == "pi_lowercase_words"
        for sample, result in zip(g.samples, mgr.results[g.row_index]):
            capture = result["_ng_token_capture"]  # rebuilt by Gym, not echoed by pi
            assert capture["n_calls"] == len(sample.turn_starts) >= 1, capture
            assert capture["generated_tokens_delivered"] == sample.num_generated, capture
            calls = _calls(result)
            for start, call in zip(sample.turn_starts, calls):
                assert sample.token_ids[:start] == call["prompt_token_ids"]
                gen = call["generation_token_ids"]
                assert sample.token_ids[start:start + len(gen)] == gen
                assert sample.gen_logprobs[start:start + len(gen)] == pytest.approx(call["generation_log_probs"])
            assert all(m == 0 for m in sample.loss_mask[:sample.turn_starts[0]])
            assert 0.0 <= sample.reward <= 1.0 and not sample.mask_sample
            assert sample.num_generated <= 32  # pi's output cap (pi_max_tokens.mjs) reached the server
    prompts = [s.turn_starts[0] for g in groups for s in g.samples]
    print(f"pi rollouts: {len(prompts)} in {mgr.metrics.seconds:.1f}s, prompt tokens {prompts}")
    # every rebuilt call is one the policy server served: its ledger is keyed by prompt + generated ids
    assert mgr.metrics.looked_up and mgr.metrics.unversioned_calls == 0
    # retired after handoff: no frozen records are left in Gym's store
    assert not list(stack.plan.token_capture_dir.glob("*.tokens.jsonl"))


async def _run(client: httpx.AsyncClient, stack: GymStack, row: dict, rollout_id: str) -> dict:
    agent = row["agent_ref"]["name"]
    body = {**copy.deepcopy(row), ROLLOUT_ID_KEY: rollout_id}
    params = body.setdefault("responses_create_params", {})
    params.update(temperature=1.0, top_p=1.0, max_output_tokens=16)
    r = await client.post(f"{stack.agents[agent].rstrip('/')}/run", json=body)
    assert r.status_code == 200, r.text[:500]
    return r.json()


@pytest.mark.gym
@pytest.mark.slow
def test_capture_rebuilds_what_the_agent_echoes(capture_stack):
    stack, cfg = capture_stack
    capture = TokenCapture.for_stack(stack)
    rows = (_rows(cfg, "lowercase_words_captured", "lowercase_words_simple_agent", 2)
            + _rows(cfg, "multi_turn_captured", "example_multi_turn_gymnasium_agent", 2))

    async def both(client, row):
        rid = new_rollout_id()
        result = await _run(client, stack, row, rid)
        echoed = trajectory_to_sample(result, 0)
        rebuilt = await capture.finalize(_strip_tokens(result), rid)
        assert rebuilt["_ng_token_capture"]["n_calls"] == len(echoed.turn_starts)  # rebuilt, not echoed
        assert await capture.release(rid, retire=True)
        return result, echoed, trajectory_to_sample(rebuilt, 0)

    async def main():
        async with httpx.AsyncClient(timeout=240) as client:
            return await asyncio.gather(*[both(client, row) for row in rows])

    try:
        pairs = asyncio.run(main())
    finally:
        capture.close()
    turns = []
    for result, echoed, rebuilt in pairs:
        assert rebuilt.token_ids == echoed.token_ids
        assert rebuilt.loss_mask == echoed.loss_mask
        assert rebuilt.gen_logprobs == pytest.approx(echoed.gen_logprobs, abs=0)
        assert rebuilt.turn_starts == echoed.turn_starts and rebuilt.reward == echoed.reward
        turns.append(len(echoed.turn_starts))
    assert max(turns) > 1, f"no multi-call rollout among {turns}"


@pytest.mark.gym
@pytest.mark.slow
def test_incomplete_capture_is_refused(capture_stack):
    """A rollout one of whose model calls never yielded tokens (the policy server refused it with
    400: Gym registered the call's intent and never recorded its entry) is masked by Gym's store and
    refused here, even though the rest of it is a clean, trainable rollout."""
    stack, cfg = capture_stack
    capture = TokenCapture.for_stack(stack)
    row = _rows(cfg, "lowercase_words_captured", "lowercase_words_simple_agent", 1)[0]
    model_url = stack.instances["policy_model"].url.rstrip("/")

    async def main():
        rid = new_rollout_id()
        async with httpx.AsyncClient(timeout=240) as client:
            result = await _run(client, stack, row, rid)
            # fault injection: one more model call of this rollout, at a temperature the policy
            # server's sampling guard refuses
            r = await client.post(f"{model_url}/ng-rollout/{rid}/training-token-capture/v1/responses",
                                  json={"input": [{"role": "user", "content": "hello"}], "temperature": 0.3})
            assert r.status_code >= 400
        trajectory_to_sample(result, 0)  # the echoed part alone would have made a sample
        with pytest.raises(CaptureRefused, match="capture incomplete"):
            await capture.finalize(_strip_tokens(result), rid)
        return rid

    try:
        rid = asyncio.run(main())
    finally:
        capture.close()
    # refused captures stay in Gym's store as evidence
    assert list(stack.plan.token_capture_dir.glob(f"{rid}.*"))
