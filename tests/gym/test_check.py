"""`megagym gym check` (megagym/gym/check.py) on Gym 0.7.0's own files and servers.

Classification and bad input read Gym's installed environments and start nothing. One test runs
a small sample of the conformance sweep (scripts/gym_check_sweep.sh): two environments in one Gym
stack built from Gym's own config files, a game (blackjack, gymnasium agent, multi-step) and a
single tool call, on the session's policy server.
"""

from __future__ import annotations

import pytest

from megagym.config.loader import ConfigError
from megagym.gym import check

pytestmark = [pytest.mark.gym]


@pytest.fixture(scope="module")
def gym_root():
    return check.gym_root_of(".venv-gym")


def test_unknown_environment_lists_the_closest_names(gym_root):
    with pytest.raises(ConfigError, match=r"ships no environment 'blakjack'; closest: blackjack"):
        check.lookup("blakjack", gym_root)
    with pytest.raises(ConfigError, match=r"has no config 'nope' \(configs: .*reasoning_gym"):
        check.lookup("reasoning_gym:nope", gym_root)


def test_cli_bad_name_is_exit_2_with_the_closest_names(gym_root, capsys):
    from megagym.gym.cli import main

    assert main(["check", "wordel"]) == 2
    err = capsys.readouterr().err
    assert "megagym gym check: Gym 0.7.0 ships no environment 'wordel'; closest: wordle" in err


def test_missing_package_names_it_and_the_install_command(gym_root):
    installed = check.installed_distributions(gym_root) - {"tiktoken"}
    env = check.classify(check.GymEnv("graphwalks", check.default_config(gym_root / "resources_servers/graphwalks")),
                         gym_root, installed)
    assert env.missing == ["tiktoken"]
    assert "packages missing from Gym's venv: tiktoken (install: megagym gym check --install graphwalks)" in env.needs


def test_requirement_lines(tmp_path, gym_root):
    (tmp_path / "requirements.txt").write_text(
        "-e nemo-gym[dev] @ ../../\n# a comment\nnumpy\nmegagym-no-such-package>=1.0  # why\n"
        "git+https://example.invalid/x.git@main#egg=megagym-no-such-egg\n")
    assert check.missing_requirements([tmp_path], check.installed_distributions(gym_root)) == [
        "megagym-no-such-package>=1.0", "git+https://example.invalid/x.git@main#egg=megagym-no-such-egg"]


@pytest.mark.parametrize("name, needs", [
    ("arena_judge", "a judge model 'arena_judge_judge_model'"),
    ("over_refusal_detection", "settings it does not get: judge_api_key, judge_base_url, judge_model_name"),
    ("ns_tools", "a code-execution sandbox server (NEMO_SKILLS_SANDBOX_HOST"),
    ("swebench", "an agent config from elsewhere"),
    ("asr_with_pc", "a multimodal policy (its rows carry images, audio"),  # audio in metadata.audio_data
])
def test_needs_beyond_the_policy_are_named_before_starting(gym_root, name, needs):
    assert any(n.startswith(needs) for n in check.lookup(name, gym_root).needs)


def test_policy_only_environments(gym_root):
    for name, agent in [("blackjack", "blackjack_gymnasium_agent"), ("math_with_judge", "math_with_judge_simple_agent"),
                        ("example_multi_turn_gymnasium", "example_multi_turn_gymnasium_agent")]:
        env = check.lookup(name, gym_root)
        assert (env.needs, env.agent) == ([], agent)
    assert len(check.shipped(gym_root)) == 145


def test_batches_never_repeat_an_instance_name(gym_root):
    envs = [check.lookup(n, gym_root) for n in ["blackjack", "wordle", "math_with_judge"]]
    envs.append(check.lookup("math_with_judge:dapo17k", gym_root))  # defines math_with_judge again
    assert [[e.name for e in b] for b in check.batches(envs, 8)] == [
        ["blackjack", "wordle", "math_with_judge"], ["math_with_judge:dapo17k"]]


@pytest.mark.slow
def test_sample_of_the_sweep(policy, gym_root, tmp_path):
    """Two environments in one stack from Gym's own configs: every row yields a sample."""
    url, _ = policy
    envs = [check.lookup(n, gym_root) for n in ["blackjack", "example_single_tool_call"]]
    results = check.run_check(envs, tmp_path, policy_url=url, max_output_tokens=16)
    for r in results:
        assert (r.outcome, r.rows, r.samples, r.contiguity) == ("ran", 5, 5, True), r
    assert -1 <= results[0].reward_min <= results[0].reward_max <= 1  # blackjack: loss, draw or win
    assert check.counts(results) == {"ran": 2, "needs": 0, "failed-gym": 0, "failed-megagym": 0}
    assert "blackjack_gymnasium_agent" in check.table(results)
    assert not list(tmp_path.glob("batch*/gym_stack.json")), "a stack was not stopped"


def test_catalog_entries_from_the_check_load_their_rows():
    """The environments added to configs/gym/envs/ after they passed the sweep resolve and route."""
    from megagym.gym.config import GymConfig, resolve_environments
    from megagym.gym.rows import load_env_rows

    cfg = GymConfig(environments=["blackjack", "example_single_tool_call", "calendar"])
    specs = resolve_environments(cfg)
    rows = load_env_rows(cfg, "train")
    assert {r["agent_ref"]["name"] for r in rows} == {s.agent for s in specs.values()}
    assert len(rows) == 15
