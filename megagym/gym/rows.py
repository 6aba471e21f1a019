"""The dataset rows of a run's Gym environments.

Owns: `load_env_rows(cfg, split)` — reading each environment's train or validation JSONL (a
path, or `gym:` inside Gym's installed package), in environment order, and stamping `agent_ref`
with the environment's agent where a row names none, so every row routes to its agent.
Must not: change a row beyond `agent_ref`, or send anything (the rollout manager does).
"""

from __future__ import annotations

from megagym.data.dataset import read_rows
from megagym.gym.compose import gym_install_root
from megagym.gym.config import GymConfig, resolve_environments, resolve_path

AGENT_TYPE = "responses_api_agents"


def load_env_rows(cfg: GymConfig, split: str = "train", limit: int | None = None) -> list[dict]:
    """Rows of every environment of the run, in environment order; each row names its agent."""
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    specs = resolve_environments(cfg)
    gym_root = None
    rows: list[dict] = []
    for name, spec in specs.items():
        path = getattr(spec, f"{split}_data")
        if not path:
            continue
        if path.startswith("gym:") and gym_root is None:
            gym_root = gym_install_root(cfg.venv)
        for row in read_rows(resolve_path(path, gym_root), limit=limit):
            if not isinstance(row.get("agent_ref"), dict) or not row["agent_ref"].get("name"):
                row["agent_ref"] = {"type": AGENT_TYPE, "name": spec.agent}
            rows.append(row)
    if not rows:
        raise ValueError(f"no {split} rows: none of {list(specs)} names {split}_data")
    return rows
