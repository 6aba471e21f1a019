"""Fixtures of the Gym tests: ONE Gym stack per test session serving every environment under test,
pointed at the session's one `megagym serve` (the `policy_server` fixture of tests/conftest.py).

The stack runs math_with_judge, workplace_assistant, example_multi_turn_gymnasium (scripted user
turns: multi-call trajectories even from a random model) and megagym's own lowercase_words.
"""

from __future__ import annotations

import pytest

from megagym.gym import GymConfig, GymStack
from megagym.gym.kill import marker_pids

SESSION_ENVS = ["math_with_judge", "workplace_assistant", "lowercase_words", "example_multi_turn_gymnasium"]


def pytest_collection_modifyitems(config, items):
    from pathlib import Path

    if not Path(__file__).resolve().parents[2].joinpath(".venv-gym", "bin", "gym").exists():
        skip = pytest.mark.skip(reason="Gym's venv is missing: run `bash scripts/setup_gym.sh`")
        for item in items:
            if "gym" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def policy(policy_server):
    """(base URL with /v1, served model name) of the session's policy server."""
    return f"{policy_server.base_url}/v1", str(policy_server.model_path)


@pytest.fixture(scope="session")
def gym_stack(policy, tmp_path_factory):
    url, model = policy
    cfg = GymConfig(environments=SESSION_ENVS, start_timeout_s=420)
    stack = GymStack.start(cfg, [url], model, run_dir=tmp_path_factory.mktemp("gym_session"))
    try:
        yield stack
    finally:
        left = stack.stop()
        assert not left and not marker_pids(stack.run_id), f"processes of the Gym stack left: {left}"
