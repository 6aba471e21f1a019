"""Gym composition, trajectory -> Sample and the rollout manager's retry logic, without processes."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import yaml

from megagym.config import ConfigError, load
from megagym.config.schema import RunConfig
from megagym.gym.compose import compose, publish_policy_endpoint, stack_tmpdir
from megagym.gym.config import GymConfig, resolve_environments
from megagym.rollout import ContiguityError, RolloutConfig, RolloutManager, TrajectoryError, trajectory_to_sample
from megagym.gym.rows import load_env_rows
from megagym.rollout.manager import stamp_row

URLS = ["http://127.0.0.1:9/v1", "http://127.0.0.1:10/v1"]


def _cfg(tmp_path, text: str, overrides=()):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return load(RunConfig, p, list(overrides))


def test_compose_from_yaml_and_overrides(tmp_path):
    cfg = _cfg(tmp_path, """
env:
  environments: [math_with_judge, lowercase_words]
  policy_base_urls: [http://127.0.0.1:9/v1, http://127.0.0.1:10/v1]
  policy_model_name: tiny
  overrides:
    lowercase_words_simple_agent: {responses_api_agents: {simple_agent: {max_steps: 2}}}
rollout: {n: 4, max_output_tokens: 16}
""", ["env.head_port=12345", "env.overrides.math_with_judge.resources_servers.math_with_judge.should_use_judge=false",
      "rollout.temperature=0.7", "grpo.temperature=0.7"])
    plan = compose(cfg.env, run_dir=tmp_path / "gym")
    names = [p.name for p in plan.config_paths]
    assert names == ["math_with_judge.yaml", "lowercase_words.yaml", "vllm_model_for_training.yaml"]
    assert plan.argv[:3][1:] == ["env", "start"] and plan.argv[-1] == str(plan.overrides_file)
    assert plan.argv.count("--config") == 4
    written = yaml.safe_load(plan.overrides_file.read_text())
    assert written["policy_base_url"] == URLS and written["policy_model_name"] == "tiny"
    assert written["head_server"] == {"host": "127.0.0.1", "port": 12345}
    assert written["skip_venv_if_present"] is True and written["uv_venv_dir"] == str(plan.venv_links)
    assert written["lowercase_words_simple_agent"]["responses_api_agents"]["simple_agent"]["max_steps"] == 2
    assert written["math_with_judge"]["resources_servers"]["math_with_judge"]["should_use_judge"] is False
    # the policy model's endpoint file: absent at start (every URL serves), then the one server left
    model = written["policy_model"]["responses_api_models"]["vllm_model"]
    assert model["endpoint_file"] == str(plan.policy_endpoint_file) and model["endpoint_stale_grace_s"] >= 1e9
    assert not plan.policy_endpoint_file.exists()
    publish_policy_endpoint(plan, URLS[1])
    assert plan.policy_endpoint_file.read_text().strip() == URLS[1]
    assert plan.agent_to_env == {"math_with_judge_simple_agent": "math_with_judge",
                                 "lowercase_words_simple_agent": "lowercase_words"}
    assert plan.env["NEMO_GYM_EXTRA_ROOTS"].endswith("/envs")
    assert plan.env["RAY_TMPDIR"] == str(stack_tmpdir(plan.run_id))  # never joins a neighbour's Ray
    assert plan.env["TMPDIR"] == plan.env["RAY_TMPDIR"]  # removed with the stack
    # every server folder Gym may start has a link to the one prepared venv
    link = plan.venv_links / "resources_servers" / "lowercase_words" / ".venv"
    assert (link / "bin" / "python").exists()
    assert (plan.venv_links / "responses_api_agents" / "simple_agent" / ".venv" / "bin" / "gym").exists()
    assert cfg.rollout.temperature == 0.7
    body = stamp_row({"responses_create_params": {"input": "hi", "temperature": 0.1}}, cfg.rollout)
    assert body["responses_create_params"] == {"input": "hi", "temperature": 0.7, "top_p": 1.0,
                                               "max_output_tokens": 16}


def test_two_environments_rows_route_by_agent():
    cfg = GymConfig(environments=["math_with_judge", "lowercase_words"])
    rows = load_env_rows(cfg, "train")
    agents = {r["agent_ref"]["name"] for r in rows}
    assert agents == {"math_with_judge_simple_agent", "lowercase_words_simple_agent"}


def test_unknown_environment_is_a_clear_error(tmp_path):
    cfg = _cfg(tmp_path, "env: {environments: [math_with_judg]}\n")
    with pytest.raises(ConfigError, match=r"unknown environment 'math_with_judg'; did you mean 'math_with_judge'"):
        resolve_environments(cfg.env)
    with pytest.raises(ConfigError, match=r"unknown key 'env.enviroments'; did you mean 'environments'"):
        _cfg(tmp_path, "env: {enviroments: [x]}\n")


def test_inline_definition_and_missing_gym_config(tmp_path):
    cfg = GymConfig(environments=["mine"], definitions={"mine": {
        "gym_configs": ["resources_servers/nope/configs/nope.yaml"], "agent": "nope_agent"}})
    with pytest.raises(ConfigError, match=r"environment 'mine': Gym config 'resources_servers/nope"):
        compose(cfg, URLS, "tiny", run_dir=tmp_path, write=False)
    bad = GymConfig(environments=["mine"], definitions={"mine": {"gym_configs": ["x.yaml"], "agnt": "a"}})
    with pytest.raises(ConfigError, match=r"env.definitions.mine.agnt'; did you mean 'agent'"):
        resolve_environments(bad)


# ------------------------------------------------------------------------ trajectory -> Sample

def _call(prompt, gen, lps=None, kind="message"):
    return {"type": kind, "prompt_token_ids": prompt, "generation_token_ids": gen,
            "generation_log_probs": lps if lps is not None else [-0.5] * len(gen)}


def test_multi_call_trajectory_to_sample():
    result = {"reward": 0.25, "mask_sample": True, "response": {"incomplete_details": None, "output": [
        _call([1, 2, 3], [4, 5], [-1.0, -2.0], "function_call"),
        {"type": "function_call_output", "output": "tool says hi"},
        _call([1, 2, 3, 4, 5, 6, 7], [8], [-3.0]),
    ]}}
    s = trajectory_to_sample(result, row_index=7, env="e", weight_version=3)
    assert s.token_ids == [1, 2, 3, 4, 5, 6, 7, 8]
    assert s.loss_mask == [0, 0, 0, 1, 1, 0, 0, 1]
    assert s.gen_logprobs == [0, 0, 0, -1.0, -2.0, 0, 0, -3.0]
    assert s.turn_starts == [3, 7] and s.reward == 0.25 and s.mask_sample and not s.truncated
    assert (s.group_index, s.env, s.weight_version) == (7, "e", 3)


def test_contiguity_break_names_the_row():
    result = {"reward": 0.0, "response": {"output": [_call([1, 2, 3], [4, 5]), _call([1, 2, 3, 9, 5, 6], [7])]}}
    with pytest.raises(ContiguityError, match=r"row 12: model call 1 breaks token contiguity.*position 3 \(expected 4, got 9\)"):
        trajectory_to_sample(result, row_index=12)


def test_empty_trajectory_and_truncation():
    empty = {"reward": 0.0, "response": {"incomplete_details": {"reason": "max_output_tokens"},
                                         "output": [{"type": "message", "content": []}]}}
    with pytest.raises(TrajectoryError, match="row 3: trajectory has no generated tokens"):
        trajectory_to_sample(empty, 3)
    trunc = {"reward": 1.0, "response": {"incomplete_details": {"reason": "max_output_tokens"},
                                         "output": [_call([1], [2, 3])]}}
    assert trajectory_to_sample(trunc, 0).truncated


# ------------------------------------------------------------------------- retries and failures

def _ok_result(reward=1.0):
    return {"reward": reward, "mask_sample": False, "response": {"output": [_call([1, 2], [3, 4])]}}


def _manager(handler, **cfg):
    rc = RolloutConfig(n=2, max_concurrency=4, request_timeout_s=cfg.pop("timeout", 5.0), max_retries=cfg.pop("retries", 2),
                       backoff_s=0.01, progress=False, **cfg)
    return RolloutManager(rc, agents={"a": "http://agent-a", "b": "http://agent-b"},
                          agent_to_env={"a": "env_a", "b": "env_b"}, transport=httpx.MockTransport(handler),
                          keep_results=True)


def _rows(*agents):
    return [{"responses_create_params": {"input": f"q{i}"}, "agent_ref": {"name": a}} for i, a in enumerate(agents)]


def test_retries_transport_errors_and_5xx_then_succeeds():
    calls = {"n": 0}

    def handler(request: httpx.Request):
        calls["n"] += 1
        body = json.loads(request.content)
        assert body["responses_create_params"]["max_output_tokens"] == 32
        if calls["n"] <= 4:  # the first attempt of each of the 4 rollouts
            raise httpx.ConnectError("refused")
        if calls["n"] <= 8:  # their second attempt
            return httpx.Response(500, json={"detail": "inner server"})
        return httpx.Response(200, json=_ok_result(0.5))

    groups = _manager(handler).collect(_rows("a", "b"), indices=[10, 11])
    assert sorted(g.row_index for g in groups) == [10, 11]
    assert all(len(g.samples) == 2 and not g.failures for g in groups)
    assert {g.env for g in groups} == {"env_a", "env_b"}


def test_failures_are_recorded_and_the_batch_goes_on():
    def handler(request: httpx.Request):
        if request.url.host == "agent-b":
            return httpx.Response(503, text="overloaded")
        return httpx.Response(200, json=_ok_result())

    mgr = _manager(handler, retries=1)
    groups = {g.row_index: g for g in mgr.collect(_rows("a", "b"))}
    assert len(groups[0].samples) == 2 and groups[0].failures == []
    assert groups[1].samples == [] and len(groups[1].failures) == 2
    assert all("HTTP 503" in f and "after 2 attempts" in f for f in groups[1].failures)
    m = mgr.metrics.summary()
    assert m["rollout/env_b/failures"] == 2 and m["rollout/env_a/reward_mean"] == 1.0
    assert m["rollout/env_a/success_rate"] == 1.0


def test_4xx_is_not_retried_and_hung_requests_time_out():
    calls = {"n": 0}

    async def handler(request: httpx.Request):
        calls["n"] += 1
        if request.url.host == "agent-a":
            return httpx.Response(422, text="bad row")
        await asyncio.sleep(30)

    groups = {g.row_index: g for g in _manager(handler, timeout=0.3, retries=1).collect(_rows("a", "b"))}
    assert all("HTTP 422" in f for f in groups[0].failures)
    assert all(f.startswith("timeout") and "after 2 attempts" in f for f in groups[1].failures)
    assert calls["n"] == 2 + 4  # 422 once per rollout; the hung agent twice per rollout


def test_drop_group_on_failure_and_unknown_agent():
    def handler(request: httpx.Request):
        if json.loads(request.content).get("fail"):
            return httpx.Response(400, text="no")
        return httpx.Response(200, json=_ok_result())

    rows = _rows("a")
    rows[0]["fail"] = False
    mgr = _manager(handler, drop_group_on_failure=True)
    assert len(mgr.collect(rows)[0].samples) == 2
    with pytest.raises(ValueError, match=r"row 0 routes to agent 'zzz'.*agents: a, b"):
        mgr.collect(_rows("zzz"))


def test_contiguity_error_ends_the_batch():
    def handler(request: httpx.Request):
        return httpx.Response(200, json={"reward": 0.0, "response": {"output": [
            _call([1, 2], [3]), _call([1, 9, 3], [4])]}})

    with pytest.raises(ContiguityError, match="row 5"):
        _manager(handler).collect(_rows("a"), indices=[5])


def test_cli_errors_name_their_cause(tmp_path, capsys):
    from megagym.gym.cli import main

    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"run: {{output_dir: {tmp_path}/run}}\nenv: {{environments: [lowercase_wordz]}}\n")
    assert main(["start", str(cfg)]) == 2
    assert "unknown environment 'lowercase_wordz'; did you mean 'lowercase_words'" in capsys.readouterr().err
    assert main(["start", str(cfg), "env.environments=[lowercase_words]"]) == 2
    assert "env.policy_base_urls is empty" in capsys.readouterr().err
    assert main(["stop", str(cfg)]) == 2
    assert f"no running Gym stack recorded in {tmp_path}/run/gym/gym_stack.json" in capsys.readouterr().err


# ------------------------------------------------------------------------- training batches

class _NoDeadServersStack:
    """Stands in for a running GymStack (agents and liveness only): requests go to a mock transport."""

    agents = {"lowercase_words_simple_agent": "http://agent"}
    agent_to_env = {"lowercase_words_simple_agent": "lowercase_words"}

    def dead_servers(self):
        return {}

    def agent_dependencies(self, agent):
        return [agent]


def _three_row_source(cfg, handler):
    """A BatchSource over the first 3 lowercase_words rows whose rollouts go to `handler`."""
    from megagym.data.dataset import PromptCursor
    from megagym.rollout.batches import BatchSource

    stack = _NoDeadServersStack()
    source = BatchSource(cfg, stack)
    source.rows = source.rows[:3]
    source.cursor = PromptCursor(3, seed=cfg.run.seed)
    source.manager = RolloutManager(cfg.rollout, stack, transport=httpx.MockTransport(handler))
    return source


def test_a_row_taken_twice_in_one_batch_gives_two_groups_with_their_own_baselines(tmp_path):
    """3 rows, 4 prompts a step: the cursor crosses an epoch inside the batch, so one row is in it
    twice. Each group keeps its own baseline (they used to share one: group id = row index)."""
    import torch

    from megagym.driver import Driver
    from megagym.trainer.advantages import group_advantages

    cfg = _cfg(tmp_path, "env: {environments: [lowercase_words]}\n",
               ["train.prompts_per_step=4", "rollout.n=2", "rollout.progress=false", "grpo.normalize_std=false"])
    rewards = iter([0.1 * k for k in range(1, 100)])  # every rollout its own reward

    def handler(request: httpx.Request):
        return httpx.Response(200, json=_ok_result(next(rewards)))

    source = _three_row_source(cfg, handler)
    try:
        batch = source.next()
    finally:
        source.close()
    rows = [g.row_index for g in batch.groups]
    assert len(rows) == 4 and len(set(rows)) == 3  # one row twice: the batch crossed an epoch
    samples = Driver(cfg, active=True).trainable(batch, {})
    assert len({s.group_index for s in samples}) == 4
    for g in batch.groups:
        expect = group_advantages(torch.tensor(g.rewards), normalize_std=False).tolist()
        assert [s.advantage for s in g.samples] == pytest.approx(expect, abs=1e-6)
        assert {s.row_index for s in g.samples} == {g.row_index}


def test_samples_carry_the_weight_version_the_servers_had_when_their_batch_began(tmp_path):
    """Gym does not pass the servers' weight_version through, so the batch stamps the version the
    loop recorded at the last sync; a prefetched batch keeps the version it began with."""
    cfg = _cfg(tmp_path, "env: {environments: [lowercase_words]}\n",
               ["train.prompts_per_step=2", "rollout.n=2", "rollout.progress=false"])
    source = _three_row_source(cfg, lambda request: httpx.Response(200, json=_ok_result(1.0)))
    try:
        assert {s.weight_version for s in source.next().samples} == {0}
        source.weight_version = 3  # the loop, after the servers acknowledged version 3
        source.prefetch()
        source.wait_prefetch()
        source.weight_version = 4  # a later sync does not restamp the batch collected before it
        assert {s.weight_version for s in source.next().samples} == {3}
    finally:
        source.close()


def test_token_versions_are_looked_up_on_the_policy_servers_per_model_call():
    """Gym drops every field but the token ones, so each model call's weight versions are looked up
    by its token key on the policy servers: the one that served it answers, the others have none."""
    from megagym.token_versions import generation_key

    calls = [([1, 2], [3, 4, 5]), ([1, 2, 3, 4, 5, 6], [7, 8])]
    records = {"http://policy-b": {generation_key(*calls[0]): [[0, 4], [2, 5]], generation_key(*calls[1]): [[0, 5]]}}
    asked = []

    def handler(request: httpx.Request):
        host = f"http://{request.url.host}"
        if request.url.path == "/megagym/token_versions":
            keys = json.loads(request.content)["keys"]
            asked.append((host, len(keys)))
            return httpx.Response(200, json={"versions": [records.get(host, {}).get(k) for k in keys]})
        out = [_call(p, g) for p, g in calls]
        return httpx.Response(200, json={"reward": 1.0, "response": {"output": out}})

    rc = RolloutConfig(n=1, max_concurrency=2, request_timeout_s=5.0, progress=False)
    mgr = RolloutManager(rc, agents={"a": "http://agent-a"}, agent_to_env={"a": "env_a"},
                         transport=httpx.MockTransport(handler), policy_servers=["http://policy-a", "http://policy-b/"])
    mgr.weight_version = 9  # the fallback stamp is not used: both calls have records
    (group,) = mgr.collect(_rows("a"))
    (s,) = group.samples
    assert s.generated_versions() == [4, 4, 5, 5, 5] and s.weight_version == 4
    assert s.token_versions == [-1, -1, 4, 4, 5, -1, 5, 5]
    assert asked == [("http://policy-a", 2), ("http://policy-b", 2)]
    m = mgr.metrics.summary()
    assert m["rollout/version_lookup_failures"] == 0 and m["rollout/split_server_rollouts"] == 0
    # no server has a record (e.g. it died): the calls keep the version the rollout started with
    records.clear()
    (group,) = mgr.collect(_rows("a"))
    assert group.samples[0].generated_versions() == [9] * 5 and group.samples[0].token_versions == []
    assert mgr.metrics.summary()["rollout/version_lookup_failures"] == 2
