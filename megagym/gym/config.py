"""Typed settings of the Gym side of a run: the `env:` section and the environment catalog.

Owns: `GymConfig` (which environments a run uses, Gym-level overrides, where Gym's venv is, ports,
timeouts) and `EnvironmentSpec` (one environment: its Gym config files, the agent its rows route to,
its data). Environments are chosen by name; a name is looked up first in `env.definitions` (inline
in the run YAML) and then in the catalog folders (`configs/gym/envs/<name>.yaml`), so adding an
environment or changing its parameters is a YAML change, never a code change.
Must not: start processes, talk HTTP or import nemo_gym (Gym runs in its own Python 3.13 venv).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path

from megagym.config.loader import ConfigError, build, read_yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
GYM_PREFIX = "gym:"  # data/config paths relative to Gym's install root (site-packages of .venv-gym)


@dataclass
class EnvironmentSpec:
    """One Gym environment as megagym uses it.

    gym_configs      Gym config files composed into the run. Relative paths are looked up the way
                     Gym does: under `extra_roots`, then Gym's install root.
    agent            the Gym agent instance rows of this environment route to (`agent_ref.name`).
    train_data       Gym JSONL rows; `gym:` prefix = relative to Gym's install root, otherwise
    validation_data  relative to the working directory or the repository root.
    extra_roots      folders holding our own Gym components (`<root>/resources_servers/<name>/`),
                     relative to the repository root; passed to Gym as NEMO_GYM_EXTRA_ROOTS.
    overrides        Gym config overrides (Gym's own nested key paths) applied for this environment.
    token_capture    train through Gym's training-token capture instead of the token fields the agent
                     echoes (for agents that do not carry them back, e.g. third-party harnesses):
                     Gym's model server records every call of this agent's rollouts in Gym's file
                     store and megagym rebuilds the trajectory from it (docs/token_capture.md).
    path_dirs        folders put first on the Gym stack's PATH (a harness agent's CLI), relative to
                     the repository root.
    """

    gym_configs: list[str] = field(default_factory=list)
    agent: str = ""
    description: str = ""
    train_data: str = ""
    validation_data: str = ""
    extra_roots: list[str] = field(default_factory=list)
    overrides: dict = field(default_factory=dict)
    token_capture: bool = False
    path_dirs: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if not self.gym_configs:
            raise ValueError("gym_configs: at least one Gym config file is required")
        if not self.agent:
            raise ValueError("agent: the Gym agent instance that rows route to is required")


@dataclass
class GymConfig:
    """The `env:` section: which Gym environments a run starts and how Gym is launched."""

    environments: list[str] = field(default_factory=list)
    definitions: dict = field(default_factory=dict)  # name -> EnvironmentSpec fields (inline envs)
    catalog_dirs: list[str] = field(default_factory=lambda: ["configs/gym/envs"])
    overrides: dict = field(default_factory=dict)  # Gym config overrides for the whole stack

    # the policy: usually filled by the training loop from its running servers
    policy_base_urls: list[str] = field(default_factory=list)  # e.g. http://127.0.0.1:8000/v1
    policy_model_name: str = ""  # "" -> the first id of GET {policy_base_urls[0]}/models
    policy_api_key: str = "dummy"
    policy_config: str = "gym:responses_api_models/vllm_model/configs/vllm_model_for_training.yaml"

    # how Gym is launched
    venv: str = ".venv-gym"
    host: str = "127.0.0.1"
    head_port: int = 0  # 0: a free port
    port_range_low: int = 10001  # Gym picks its servers' ports here (probing for free ones)
    port_range_high: int = 20000
    run_dir: str = ""  # logs, composed overrides, venv links, state file; "" -> <run.output_dir>/gym
    start_timeout_s: float = 180.0
    policy_readiness_timeout_s: float = 60.0  # Gym's probe of GET {policy_base_url}/models
    stop_timeout_s: float = 20.0

    def validate(self) -> None:
        if self.head_port < 0 or self.head_port > 65535:
            raise ValueError(f"head_port: {self.head_port} is not a port (0 picks a free one)")
        if not 0 < self.port_range_low < self.port_range_high < 65536:
            raise ValueError("port_range_low < port_range_high must both be ports")
        if self.start_timeout_s <= 0 or self.stop_timeout_s <= 0:
            raise ValueError("start_timeout_s and stop_timeout_s must be positive")
        if len(set(self.environments)) != len(self.environments):
            raise ValueError(f"environments: names repeat in {self.environments}")


def resolve_path(path: str, gym_root: Path | None = None) -> Path:
    """`gym:rel` -> under Gym's install root; absolute -> as is; relative -> cwd, then repo root."""
    if path.startswith(GYM_PREFIX):
        if gym_root is None:
            raise ConfigError(f"{path}: a 'gym:' path needs Gym's install root (is .venv-gym built?)")
        return gym_root / path[len(GYM_PREFIX):]
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    if (Path.cwd() / p).exists():
        return (Path.cwd() / p).resolve()
    return REPO_ROOT / p


def catalog(cfg: GymConfig) -> dict[str, Path]:
    """Environment name -> catalog file, over `cfg.catalog_dirs` (earlier folders win)."""
    found: dict[str, Path] = {}
    for d in cfg.catalog_dirs:
        folder = resolve_path(d)
        if folder.is_dir():
            for f in sorted(folder.glob("*.yaml")):
                found.setdefault(f.stem, f)
    return found


def known_environments(cfg: GymConfig) -> list[str]:
    return sorted(set(cfg.definitions) | set(catalog(cfg)))


def resolve_environments(cfg: GymConfig) -> dict[str, EnvironmentSpec]:
    """The run's environments by name, built from inline definitions or catalog files.

    An unknown name is a `ConfigError` naming it, the closest known name and all known names.
    """
    if not cfg.environments:
        raise ConfigError(
            "env.environments is empty: name at least one environment "
            f"(known: {', '.join(known_environments(cfg)) or 'none'})"
        )
    files = catalog(cfg)
    specs: dict[str, EnvironmentSpec] = {}
    for name in cfg.environments:
        if name in cfg.definitions:
            data, where = cfg.definitions[name], f"env.definitions.{name}"
            if not isinstance(data, dict):
                raise ConfigError(f"{where}: expected a mapping of environment fields")
        elif name in files:
            data, where = read_yaml(files[name]), f"{files[name]}"
        else:
            known = known_environments(cfg)
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"env.environments: unknown environment '{name}'{hint} "
                f"(known: {', '.join(known) or 'none'}; catalog folders: {', '.join(cfg.catalog_dirs)}; "
                "or define it inline under env.definitions)"
            )
        specs[name] = build(EnvironmentSpec, dict(data), prefix=where)
    agents = [s.agent for s in specs.values()]
    dup = sorted({a for a in agents if agents.count(a) > 1})
    if dup:
        raise ConfigError(f"env.environments: several environments route to the same agent {dup}")
    return specs
