"""Compose the `gym env start` command of a run from megagym's `env:` section.

Owns: turning a `GymConfig` plus the policy servers' URLs into a `LaunchPlan` — the Gym config
files in order (each environment's, then the policy model's training config, then one generated
overrides file), the overrides (per-environment, then run-wide, then what megagym injects:
`policy_base_url` list, `policy_model_name`, `policy_api_key`, head-server address, port range,
`skip_venv_if_present` + `uv_venv_dir`), the environment variables and the working directory.
For environments with `token_capture`, it also turns on Gym's training-token capture: the run-level
`token_id_capture: {enabled, dir}` block (Gym's file store under the run dir) and the agent's own
`token_id_capture: true` flag (so only those agents' rollouts are captured). The policy model
(Gym's vllm_model) gets an endpoint file under the run dir that does not exist until
`publish_policy_endpoint` writes the one server left after the others died.
Also prepares the venv links Gym looks up (`<uv_venv_dir>/<type>/<name>/.venv`), all pointing
at the one prepared `.venv-gym`, so starting Gym installs nothing.
Must not: start processes (that is `process.py`) or import nemo_gym.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from megagym.config.loader import ConfigError
from megagym.gym.config import EnvironmentSpec, GymConfig, resolve_environments, resolve_path
from megagym.server.process import free_port

SERVER_TYPES = ("resources_servers", "responses_api_agents", "responses_api_models", "environment_servers")
RUN_MARKER_ENV = "MEGAGYM_GYM_RUN"  # inherited by every process of a Gym stack (Ray workers too)


@dataclass
class LaunchPlan:
    argv: list[str]
    env: dict[str, str]  # added to os.environ for the child
    cwd: Path
    run_dir: Path
    run_id: str
    head_url: str
    config_paths: list[Path]
    overrides: dict
    environments: dict[str, EnvironmentSpec]
    overrides_file: Path
    log_file: Path
    venv_links: Path
    extra_roots: list[Path] = field(default_factory=list)
    token_capture_dir: Path | None = None  # Gym's token file store (None: no environment captures)
    capture_agents: list[str] = field(default_factory=list)  # agents whose rollouts Gym captures
    policy_endpoint_file: Path | None = None  # Gym's vllm_model endpoint file (see `publish_policy_endpoint`)

    @property
    def agent_to_env(self) -> dict[str, str]:
        return {spec.agent: name for name, spec in self.environments.items()}



def stack_tmpdir(run_id: str) -> Path:
    """One stack's temp root, removed when the stack stops: Ray's (RAY_TMPDIR) and every Gym
    process's TMPDIR, so what they leave in a temp dir (Ray's sessions and sockets, wandb's media
    dirs, multiprocessing's listeners) goes with it, also after a SIGKILL."""
    return Path(f"/tmp/megagym-gym-{run_id}")

def gym_install_root(venv: str | Path) -> Path:
    """site-packages of Gym's venv (where nemo_gym and the built-in servers live)."""
    venv_path = resolve_path(str(venv))
    hits = sorted(venv_path.glob("lib/python3*/site-packages/nemo_gym/__init__.py"))
    if not hits:
        raise ConfigError(
            f"env.venv: no nemo_gym under {venv_path} — build Gym's venv with "
            "`bash scripts/setup_gym.sh` (the README's setup command runs it)"
        )
    return hits[-1].parent.parent


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _find_gym_config(rel: str, env_name: str, roots: list[Path], gym_root: Path) -> Path:
    if rel.startswith("gym:"):
        p = resolve_path(rel, gym_root)
        searched = [p]
    else:
        p0 = Path(rel).expanduser()
        searched = [p0] if p0.is_absolute() else [r / p0 for r in [*roots, gym_root]]
        p = next((c for c in searched if c.is_file()), searched[0])
    if not p.is_file():
        where = "\n".join(f"  - {c}" for c in searched)
        raise ConfigError(f"environment '{env_name}': Gym config '{rel}' not found; looked in:\n{where}")
    return p.resolve()


def link_venvs(links_dir: Path, venv: Path, roots: list[Path]) -> None:
    """`links_dir/<type>/<name>/.venv -> venv` for every Gym server folder under `roots`."""
    for root in roots:
        for stype in SERVER_TYPES:
            base = root / stype
            if not base.is_dir():
                continue
            for d in base.iterdir():
                if not ((d / "requirements.txt").exists() or (d / "pyproject.toml").exists()):
                    continue
                link = links_dir / stype / d.name / ".venv"
                link.parent.mkdir(parents=True, exist_ok=True)
                if link.is_symlink() or link.exists():
                    if link.resolve() == venv.resolve():
                        continue
                    link.unlink()
                link.symlink_to(venv.resolve(), target_is_directory=True)


def agent_server_type(agent: str, config_paths: list[Path]) -> str:
    """The Gym server folder of agent instance `agent` (`<agent>.responses_api_agents.<type>`)."""
    for path in config_paths:
        data = yaml.safe_load(path.read_text()) or {}
        entry = data.get(agent) if isinstance(data, dict) else None
        agents = entry.get("responses_api_agents") if isinstance(entry, dict) else None
        if isinstance(agents, dict) and len(agents) == 1:
            return next(iter(agents))
    raise ConfigError(f"agent '{agent}' is not defined as responses_api_agents in any of "
                      f"{', '.join(str(p) for p in config_paths)}")


def vllm_model_servers(config_path: Path) -> list[str]:
    """Names of the `responses_api_models.vllm_model` servers a Gym config defines."""
    data = yaml.safe_load(config_path.read_text()) or {}
    return [name for name, entry in data.items() if isinstance(entry, dict)
            and isinstance(entry.get("responses_api_models"), dict) and "vllm_model" in entry["responses_api_models"]]


def publish_policy_endpoint(plan: LaunchPlan, base_url: str) -> None:
    """Point Gym's policy model at `base_url` alone (the one policy server left after the others died).

    Gym's vllm_model re-reads its endpoint file (at most every 10 s) and sends every new session
    there. Without the file, a session pinned to a dead server retries its connection forever."""
    if plan.policy_endpoint_file is None:
        return
    tmp = plan.policy_endpoint_file.with_suffix(".tmp")
    tmp.write_text(base_url + "\n")
    os.replace(tmp, plan.policy_endpoint_file)


def compose(
    cfg: GymConfig,
    policy_base_urls: list[str] | None = None,
    policy_model_name: str | None = None,
    run_dir: str | Path | None = None,
    write: bool = True,
) -> LaunchPlan:
    """Build the launch plan of a Gym stack (and, with `write`, its overrides file and venv links)."""
    envs = resolve_environments(cfg)
    urls = list(policy_base_urls if policy_base_urls is not None else cfg.policy_base_urls)
    if not urls:
        raise ConfigError(
            "env.policy_base_urls is empty: Gym needs the policy servers' URLs "
            "(e.g. env.policy_base_urls=[http://127.0.0.1:8000/v1])"
        )
    model_name = policy_model_name or cfg.policy_model_name
    if not model_name:
        raise ConfigError("env.policy_model_name is empty: name the model the policy servers serve")
    venv = resolve_path(cfg.venv)
    gym_root = gym_install_root(venv)
    gym_bin = venv / "bin" / "gym"
    if not gym_bin.exists():
        raise ConfigError(f"env.venv: {gym_bin} is missing (rebuild with scripts/setup_gym.sh)")

    roots: list[Path] = []
    for spec in envs.values():
        for r in spec.extra_roots:
            p = resolve_path(r)
            if not p.is_dir():
                raise ConfigError(f"extra_roots: folder {r} ({p}) does not exist")
            if p not in roots:
                roots.append(p)

    config_paths: list[Path] = []
    overrides: dict = {}
    for name, spec in envs.items():
        for rel in spec.gym_configs:
            path = _find_gym_config(rel, name, roots, gym_root)
            if path not in config_paths:
                config_paths.append(path)
        overrides = deep_merge(overrides, spec.overrides)
    policy_cfg = _find_gym_config(cfg.policy_config, "policy", roots, gym_root)
    if policy_cfg not in config_paths:
        config_paths.append(policy_cfg)
    overrides = deep_merge(overrides, cfg.overrides)

    run_id = uuid.uuid4().hex[:12]
    rd = Path(run_dir) if run_dir else resolve_path(cfg.run_dir or "runs/gym")
    rd = rd.resolve()
    head_port = cfg.head_port or free_port(cfg.host)
    links = rd / "venvs"
    injected = {
        "policy_base_url": urls,
        "policy_model_name": model_name,
        "policy_api_key": cfg.policy_api_key,
        "head_server": {"host": cfg.host, "port": head_port},
        "default_host": cfg.host,
        "port_range_low": cfg.port_range_low,
        "port_range_high": cfg.port_range_high,
        "skip_venv_if_present": True,
        "uv_venv_dir": str(links),
        "server_spinup_timeout_seconds": cfg.start_timeout_s,
        "model_endpoint_readiness_timeout_seconds": cfg.policy_readiness_timeout_s,
        "results_dir": str(rd / "results"),
        "cache_dir": str(rd / "cache"),
    }
    capture_agents = [spec.agent for spec in envs.values() if spec.token_capture]
    capture_dir = rd / "token_capture" if capture_agents else None
    if capture_agents:
        injected["token_id_capture"] = {"enabled": True, "dir": str(capture_dir)}
        for agent in capture_agents:
            kind = agent_server_type(agent, config_paths)
            injected[agent] = {"responses_api_agents": {kind: {"token_id_capture": True}}}
    # An endpoint file that does not exist yet, with no deadline for its absence: Gym's vllm_model
    # then bounds its connection retries (8 x 0.5 s) instead of retrying a dead server forever, and
    # `publish_policy_endpoint` can move it onto a surviving server.
    endpoint_file = None
    for server in vllm_model_servers(policy_cfg):
        endpoint_file = rd / "policy_endpoint"
        injected.setdefault(server, {})["responses_api_models"] = {"vllm_model": {
            "endpoint_file": str(endpoint_file), "endpoint_stale_grace_s": 1.0e12}}
    overrides = deep_merge(overrides, injected)
    overrides_file = rd / "megagym_gym_overrides.yaml"

    argv = [str(gym_bin), "env", "start"]
    for p in [*config_paths, overrides_file]:
        argv += ["--config", str(p)]
    env = {
        RUN_MARKER_ENV: run_id,
        "PYTHONUNBUFFERED": "1",
        "NEMO_GYM_EXTRA_ROOTS": ":".join(str(r) for r in roots),
        "RAY_USAGE_STATS_ENABLED": "0",
        # Ray's own temp root: ray.init() without an address joins the cluster named in
        # <root>/ray/ray_current_cluster, i.e. another run's on a shared /tmp (seen: a Gym stack
        # joined a neighbour's dying Ray and never came up). Short: Ray's socket paths live under it.
        "RAY_TMPDIR": str(stack_tmpdir(run_id)),
        "TMPDIR": str(stack_tmpdir(run_id)),
    }
    path_dirs = [str(resolve_path(d)) for spec in envs.values() for d in spec.path_dirs]
    if path_dirs:
        env["PATH"] = os.pathsep.join([*dict.fromkeys(path_dirs), os.environ.get("PATH", "")])
    plan = LaunchPlan(
        argv=argv, env=env, cwd=rd, run_dir=rd, run_id=run_id,
        head_url=f"http://{cfg.host}:{head_port}", config_paths=config_paths, overrides=overrides,
        environments=envs, overrides_file=overrides_file, log_file=rd / "gym.log",
        venv_links=links, extra_roots=roots, token_capture_dir=capture_dir, capture_agents=capture_agents,
        policy_endpoint_file=endpoint_file,
    )
    if write:
        rd.mkdir(parents=True, exist_ok=True)
        if endpoint_file is not None:
            endpoint_file.unlink(missing_ok=True)  # a new stack starts on every server in `urls`
        overrides_file.write_text(
            "# Written by megagym (megagym/gym/compose.py): merged last over the Gym configs.\n"
            + yaml.safe_dump(overrides, sort_keys=False)
        )
        link_venvs(links, venv, [*roots, gym_root])
    return plan
