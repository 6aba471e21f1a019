"""`megagym gym check`: do Gym's own environments produce training samples through megagym?

Owns: the list of environments Gym ships (each resources server under Gym's install root with a
config and `data/example.jsonl`), which of its Gym config files and agent an environment name
means, what that config needs beyond the policy model — judged from the files before anything
starts: other model servers (a judge, a simulated user), settings or API keys it does not get,
a container runtime, a code sandbox, packages missing from Gym's venv (with the command that
installs them) — and, for the rest, running their example rows in batches through the training
path: each environment is an inline `env.definitions` entry built from Gym's own config file,
started by `GymStack`, rolled out by `RolloutManager` (one group of `n` per row, contiguity
checked by `trajectory_to_sample`). A batch that does not start is split in halves until the
environment that broke it stands alone; an environment whose stack died under another's failure
is run again. The outcome of each environment is a `CheckResult`; `table()` renders them.
Must not: import nemo_gym, install packages unless asked (`install_requirements`), build samples
other than through `RolloutManager`, or blame megagym for what Gym's logs name as Gym's.
"""

from __future__ import annotations

import asyncio
import collections
import difflib
import functools
import importlib.metadata as md
import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from megagym.config.loader import ConfigError
from megagym.gym.compose import gym_install_root
from megagym.gym.config import GymConfig, resolve_path
from megagym.gym.errors import GymError

POLICY = "policy_model"  # the model server megagym injects (Gym's vllm_model on our policy servers)
INJECTED = {"policy_base_url", "policy_api_key", "policy_model_name"}
CONTAINER_RE = re.compile(r"\b(docker|apptainer|singularity|podman)\b", re.I)
EXC_RE = re.compile(r"^(\w+\.)*\w*(Error|Exception|Exit|Interrupt|NotFound)\b.*")
OUTCOMES = ("ran", "needs", "failed-gym", "failed-megagym")


# ------------------------------------------------------------------------------ what Gym ships

@dataclass
class GymEnv:
    """One environment Gym ships, as `gym check` runs it.

    name     the resources server folder, or `server:config` for another of its config files
    config   the Gym config file composed into the stack
    agent    the agent instance the example rows route to
    example  its `data/example.jsonl`
    needs    why it cannot run on the policy model alone (empty: it can)
    missing  its requirement lines (resources server and agent) that Gym's venv lacks
    install  the command that installs them ("" when none are missing)
    """

    name: str
    config: Path
    agent: str = ""
    example: Path | None = None
    needs: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # requirement lines Gym's venv lacks
    install: str = ""

    def definition(self) -> dict:
        """The inline `env.definitions` entry (EnvironmentSpec fields) of this environment."""
        return {"gym_configs": [str(self.config)], "agent": self.agent, "train_data": str(self.example),
                "description": f"gym check: {self.config.name}"}

    @property
    def server(self) -> str:
        return self.name.partition(":")[0]

    def instance_names(self) -> set[str]:
        return set(_read_config(self.config))


def shipped(gym_root: Path) -> list[str]:
    """Names of every resources server Gym ships with at least one config file."""
    base = gym_root / "resources_servers"
    return sorted(d.name for d in base.iterdir() if d.is_dir() and any((d / "configs").glob("*.yaml")))


def _configs(server_dir: Path) -> list[Path]:
    return sorted((server_dir / "configs").glob("*.yaml"))


def default_config(server_dir: Path) -> Path | None:
    """The config defining the agent most example rows name; else `configs/<server>.yaml` when it
    defines an agent; else the first config (by name) that does."""
    own = server_dir / "configs" / f"{server_dir.name}.yaml"
    cs = _configs(server_dir)
    named = collections.Counter(r["agent_ref"].get("name") for r in _rows(server_dir / "data" / "example.jsonl")
                                if isinstance(r.get("agent_ref"), dict))
    for agent, _ in named.most_common():
        for c in [own, *cs]:
            if c.is_file() and agent in _agents(_read_config(c)):
                return c
    for c in [own, *cs]:
        if c.is_file() and _agents(_read_config(c)):
            return c
    return own if own.is_file() else (cs[0] if cs else None)


def lookup(name: str, gym_root: Path) -> GymEnv:
    """The environment `name` (`server` or `server:config`); an unknown name is a `ConfigError`
    listing the closest names Gym ships."""
    server, _, conf = name.partition(":")
    names = shipped(gym_root)
    if server not in names:
        close = difflib.get_close_matches(server, names, n=5, cutoff=0.4)
        hint = f"; closest: {', '.join(close)}" if close else ""
        raise ConfigError(f"gym check: Gym {gym_version(gym_root)} ships no environment '{server}'{hint} "
                          f"({len(names)} shipped: `megagym gym check --list`)")
    sdir = gym_root / "resources_servers" / server
    if conf:
        config = sdir / "configs" / f"{conf.removesuffix('.yaml')}.yaml"
        if not config.is_file():
            have = ", ".join(c.stem for c in _configs(sdir))
            raise ConfigError(f"gym check: environment '{server}' has no config '{conf}' (configs: {have})")
    else:
        config = default_config(sdir)
    return classify(GymEnv(name=name, config=config), gym_root)


def gym_version(gym_root: Path) -> str:
    """The installed nemo-gym version (read from Gym's venv, not imported)."""
    return next((d.version for d in md.distributions(path=[str(gym_root)])
                 if _norm(d.metadata["Name"] or "") == "nemo-gym"), "?")


# ------------------------------------------------------------------- what a config needs

def _read_config(path: Path) -> dict:
    data = yaml.safe_load(path.read_text()) or {}
    return data if isinstance(data, dict) else {}


def _agents(cfg: dict) -> dict[str, tuple[str, dict]]:
    """Agent instance -> (agent server folder, its block) in one Gym config."""
    out = {}
    for inst, block in cfg.items():
        body = block.get("responses_api_agents") if isinstance(block, dict) else None
        if isinstance(body, dict):
            for server, server_cfg in body.items():
                out[inst] = (server, server_cfg if isinstance(server_cfg, dict) else {})
    return out


def _walk(node, fn) -> None:
    fn(node)
    if isinstance(node, dict):
        for v in node.values():
            _walk(v, fn)
    elif isinstance(node, list):
        for v in node:
            _walk(v, fn)


def _interpolations(text: str) -> list[str]:
    """The outermost `${...}` bodies in a string (nested ones stay inside their parent)."""
    out, depth, start = [], 0, 0
    i = 0
    while i < len(text):
        if text.startswith("${", i):
            if depth == 0:
                start = i + 2
            depth += 1
            i += 2
            continue
        if text[i] == "}" and depth:
            depth -= 1
            if depth == 0:
                out.append(text[start:i])
        i += 1
    return out


def _model_needs(cfg: dict) -> list[str]:
    """Model servers other than the policy that the config references or defines."""
    refs: set[str] = set()

    def visit(n):
        if isinstance(n, dict) and n.get("type") == "responses_api_models" and isinstance(n.get("name"), str):
            refs.add(n["name"])

    _walk(cfg, visit)
    defined = {k for k, v in cfg.items() if isinstance(v, dict) and "responses_api_models" in v}
    needs = []
    for name in sorted((refs | defined) - {POLICY}):
        block = cfg.get(name, {}).get("responses_api_models", {}) if name in cfg else {}
        text = json.dumps(block)
        if name in defined and "${policy_base_url}" in text and "${policy_model_name}" in text:
            continue  # another instance on the policy model itself
        kind = "judge model" if "judge" in name or "genrm" in name or "reward" in name else "model server"
        needs.append(f"a {kind} '{name}'" + ("" if name in defined else " (not defined in the config)"))
    return needs


def _setting_needs(cfg: dict) -> list[str]:
    """Settings the config interpolates that megagym does not inject (keys, URLs, env vars)."""
    keys: set[str] = set()
    env_vars: set[str] = set()
    sandbox: set[str] = set()

    def visit(n):
        if not isinstance(n, str) or "${" not in n:
            return
        for body in _interpolations(n):
            if body.startswith("oc.env:"):
                var, _, default = body[len("oc.env:"):].partition(",")
                if "SANDBOX" in var:
                    sandbox.add(var)
                elif not default and not _env_set(var):
                    env_vars.add(var)
            elif body.startswith("oc.") or ":" in body:
                continue  # oc.select / other resolvers with their own defaults
            elif body not in INJECTED and body.split(".")[0] not in cfg:
                keys.add(body)

    _walk(cfg, visit)
    needs = []
    if keys:
        needs.append("settings it does not get: " + ", ".join(sorted(keys)))
    if env_vars:
        needs.append("environment variables: " + ", ".join(sorted(env_vars)))
    if sandbox:
        needs.append(f"a code-execution sandbox server ({', '.join(sorted(sandbox))})")
    return needs


def _env_set(var: str) -> bool:
    import os

    return bool(os.environ.get(var))


def _container_needs(folders: list[Path], config: Path) -> list[str]:
    hits = set()
    for f in [config, *(p for d in folders for p in d.glob("*.py"))]:
        try:
            for m in CONTAINER_RE.finditer(f.read_text(errors="replace")):
                hits.add(m.group(1).lower())
        except OSError:
            continue
    if not hits or any(container_runtime(h) for h in hits):
        return []
    return [f"a container runtime ({'/'.join(sorted(hits))}; none usable on this machine)"]


@functools.lru_cache(maxsize=None)
def container_runtime(name: str) -> bool:
    """Whether `name` is usable here: the binary exists and, for docker/podman, its daemon answers."""
    binary = shutil.which(name)
    if not binary:
        return False
    if name in ("docker", "podman"):
        try:
            return subprocess.run([binary, "ps"], capture_output=True, timeout=15).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False
    return True


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_distributions(gym_root: Path) -> set[str]:
    return {_norm(d.metadata["Name"]) for d in md.distributions(path=[str(gym_root)]) if d.metadata["Name"]}


def missing_requirements(folders: list[Path], installed: set[str]) -> list[str]:
    """Requirement lines of the folders (requirements.txt or pyproject.toml) whose distribution
    Gym's venv lacks."""
    from packaging.requirements import InvalidRequirement, Requirement

    missing = []
    for d in folders:
        for line in _requirement_lines(d):
            line = line.split(" #")[0].strip()
            if not line or line.startswith(("#", "-")):
                continue
            egg = re.search(r"#egg=([\w.-]+)", line)  # a bare VCS URL: its name is the egg
            try:
                r = Requirement(f"{egg.group(1)} @ {line.split('#')[0]}" if egg and "@" not in line.split("://")[0]
                                else line)
            except InvalidRequirement:
                continue
            if _norm(r.name) == "nemo-gym":
                continue
            if r.marker is not None and not r.marker.evaluate({"python_version": "3.13"}):
                continue
            if _norm(r.name) not in installed and line not in missing:
                missing.append(line)
    return missing


def _requirement_lines(folder: Path) -> list[str]:
    """A Gym server folder's requirements: requirements.txt lines, else pyproject.toml's
    `[project] dependencies` (Gym's own venv builder reads either)."""
    req, pyproject = folder / "requirements.txt", folder / "pyproject.toml"
    if req.is_file():
        return req.read_text().splitlines()
    if pyproject.is_file():
        import tomllib

        try:
            return list(tomllib.loads(pyproject.read_text()).get("project", {}).get("dependencies", []))
        except tomllib.TOMLDecodeError:
            return []
    return []


def install_command(env_name: str) -> str:
    """The documented command that installs an environment's missing packages into Gym's venv."""
    return f"megagym gym check --install {env_name}"


def classify(env: GymEnv, gym_root: Path, installed: set[str] | None = None) -> GymEnv:
    """Fill `agent`, `example`, `needs` and `install` of `env` from its files (starts nothing)."""
    server = env.name.partition(":")[0]
    sdir = gym_root / "resources_servers" / server
    env.example = sdir / "data" / "example.jsonl"
    if env.config is None or not env.config.is_file():
        env.needs.append("no Gym config file")
        return env
    cfg = _read_config(env.config)
    agents = _agents(cfg)
    rows = _rows(env.example)
    if not rows:
        env.needs.append("no example rows (data/example.jsonl missing or empty)")
    elif any(re.search(r'"(input_image|image_url|input_audio|input_file|audio_url|audio_data|audio_paths?)"',
                       json.dumps(r)) for r in rows):
        env.needs.append("a multimodal policy (its rows carry images, audio or files; megagym's policy "
                         "server takes text only)")
    named = collections.Counter(r.get("agent_ref", {}).get("name") for r in rows
                                if isinstance(r.get("agent_ref"), dict))
    in_cfg = [a for a, _ in named.most_common() if a in agents]
    env.agent = (in_cfg[0] if in_cfg else
                 next((a for a in agents if a.endswith("_simple_agent")), next(iter(agents), "")))
    if not env.agent:
        env.needs.append(f"an agent config from elsewhere ({env.config.name} defines no agent)")
        return env
    folders = [sdir] + [gym_root / "responses_api_agents" / srv for srv, _ in agents.values()]
    env.needs += _model_needs(cfg) + _setting_needs(cfg) + _container_needs(folders, env.config)
    missing = missing_requirements(folders, installed if installed is not None else installed_distributions(gym_root))
    if missing:
        env.missing = missing
        env.install = install_command(env.name)
        env.needs.append(f"packages missing from Gym's venv: {', '.join(missing)} (install: {env.install})")
    return env


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def install_requirements(missing: list[str], venv: str = ".venv-gym") -> int:
    """pip-install requirement specs into Gym's venv (the command `needs` names)."""
    py = resolve_path(venv) / "bin" / "python"
    cmd = [str(py), "-m", "pip", "install", *missing]
    print("megagym gym check: " + " ".join(cmd), flush=True)
    return subprocess.call(cmd)


# ----------------------------------------------------------------------------- running them

@dataclass
class CheckResult:
    env: str
    agent: str
    outcome: str  # one of OUTCOMES
    rows: int = 0
    rollouts: int = 0
    samples: int = 0
    contiguity: bool | None = None  # None: nothing was checked
    reward_min: float | None = None
    reward_max: float | None = None
    reason: str = ""
    seconds: float = 0.0

    def row(self) -> list[str]:
        rew = "" if self.reward_min is None else f"{self.reward_min:g}..{self.reward_max:g}"
        cont = {None: "", True: "yes", False: "NO"}[self.contiguity]
        return [self.env, self.agent, str(self.rows), f"{self.samples}/{self.rollouts}" if self.rollouts else "",
                cont, rew, self.outcome, self.reason]


def needs_result(env: GymEnv) -> CheckResult:
    return CheckResult(env.name, env.agent, "needs", rows=len(_rows(env.example)) if env.example else 0,
                       reason="needs " + "; ".join(env.needs))


def log_reason(log_text: str, instances: set[str], server: str = "") -> str:
    """The last exception Gym logged for one of `instances`: a line `(instance) SomeError: ...`, or
    a traceback (prefixed by an instance, or whose frames are in `resources_servers/<server>/`)."""
    last, block, owner = "", None, False
    frag = f"resources_servers/{server}/" if server else None
    for line in log_text.splitlines():
        m = re.match(r"^\((\w+)\)\s?(.*)$", line)
        prefix, text = (m.group(1), m.group(2)) if m else ("", line)
        text = text.removeprefix("ERROR:").strip() if text.startswith("ERROR:") else text
        if "Traceback (most recent call last)" in text:
            block, owner = [], prefix in instances
            continue
        if block is not None:
            owner = owner or bool(frag and frag in text)
            if EXC_RE.match(text) and not text[:1].isspace():
                if owner and not text.startswith(("asyncio.exceptions.CancelledError", "KeyboardInterrupt")):
                    last = text.strip()
                block = None
            continue
        if prefix in instances and EXC_RE.match(text.strip()) and "CancelledError" not in text:
            last = text.strip()
    return last[:240]


def culprits(text: str, envs: list[GymEnv], log_text: str = "") -> list[GymEnv]:
    """The environments that broke a stack's start: those owning the servers Gym (or GymStack's
    start error) names in `text` as having died or not come up, and those whose servers logged an
    exception (Gym stops at the first death, so the others would otherwise cost a restart each)."""
    names = set(re.findall(r"Process `(\w+)` finished unexpectedly", text))
    m = re.search(r"these Gym servers did not come up within [^:]*: (.*)", text)
    if m:
        names |= set(re.findall(r"(\w+) \(", m.group(1)))
    return [e for e in envs if e.instance_names() & names
            or (log_text and log_reason(log_text, e.instance_names(), e.server))]


def start_failure_reason(message: str, log_text: str, instances: set[str], server: str = "") -> str:
    why = log_reason(log_text, instances, server)
    died = [n for n in re.findall(r"Process `(\w+)` finished unexpectedly", log_text) if n in instances]
    if not why and died:
        why = f"Gym's server `{died[0]}` exited without logging an exception"
    cli_error = re.search(r"^Error: (.*(?:\n\S.*)?)", log_text, re.M)  # `gym env start` refused the config
    if not why and cli_error:
        why = "Gym: " + " ".join(cli_error.group(1).split())
    if not why:  # the start error itself: its first line names what did not come up
        why = message.strip().splitlines()[0] if message.strip() else "Gym did not start"
    return f"did not start: {why}"[:300]


class Checker:
    """Runs `GymEnv`s through GymStack + RolloutManager on one policy server, batch by batch."""

    def __init__(self, policy_url: str, model: str, run_dir: Path, *, n: int = 1, max_output_tokens: int = 32,
                 request_timeout_s: float = 180.0, start_timeout_s: float = 300.0, venv: str = ".venv-gym",
                 log=print):
        from megagym.rollout.config import RolloutConfig

        self.policy_url, self.model, self.run_dir = policy_url, model, Path(run_dir)
        self.rollout = RolloutConfig(n=n, max_concurrency=8, temperature=1.0, top_p=1.0,
                                     max_output_tokens=max_output_tokens, request_timeout_s=request_timeout_s,
                                     max_retries=1, backoff_s=1.0, progress=False)
        self.start_timeout_s, self.venv, self.log = start_timeout_s, venv, log
        self._batch = 0

    def gym_config(self, envs: list[GymEnv]) -> GymConfig:
        return GymConfig(environments=[e.name for e in envs], definitions={e.name: e.definition() for e in envs},
                         catalog_dirs=[], venv=self.venv, start_timeout_s=self.start_timeout_s)

    def run(self, envs: list[GymEnv], batch_size: int = 8) -> list[CheckResult]:
        results: list[CheckResult] = []
        for batch in batches(envs, batch_size):
            for r in self.run_batch(batch):
                self.log(f"gym check: {r.env}: {r.outcome} {r.samples}/{r.rollouts} samples {r.reason}".rstrip())
                results.append(r)
        return results

    def run_batch(self, envs: list[GymEnv], retry: bool = True) -> list[CheckResult]:
        from megagym.gym.stack import GymStack

        self._batch += 1
        rd = self.run_dir / f"batch{self._batch:03d}"
        self.log(f"gym check: batch {self._batch}: starting {len(envs)}: {', '.join(e.name for e in envs)}")
        cfg = self.gym_config(envs)
        t0 = time.monotonic()
        try:
            stack = GymStack.start(cfg, [self.policy_url], self.model, run_dir=rd)
        except (GymError, ConfigError) as e:
            log_text = _read(rd / "gym.log")
            if len(envs) == 1:
                env = envs[0]
                side = "failed-megagym" if isinstance(e, ConfigError) else "failed-gym"
                return [CheckResult(env.name, env.agent, side, rows=len(_rows(env.example)),
                                    reason=start_failure_reason(str(e), log_text, env.instance_names(), env.server),
                                    seconds=time.monotonic() - t0)]
            named = culprits(str(e) + "\n" + log_text, envs, log_text)
            if named and len(named) < len(envs):  # Gym named the servers that broke the batch
                self.log(f"gym check: batch {self._batch} did not start because of {', '.join(e.name for e in named)}")
                bad = [CheckResult(x.name, x.agent, "failed-gym", rows=len(_rows(x.example)),
                                   reason=start_failure_reason(str(e), log_text, x.instance_names(), x.server))
                       for x in named]
                rest = self.run_batch([x for x in envs if x not in named])
                done = {r.env: r for r in bad + rest}
                return [done[x.name] for x in envs]
            half = len(envs) // 2
            self.log(f"gym check: batch {self._batch} did not start; splitting it")
            return self.run_batch(envs[:half]) + self.run_batch(envs[half:])
        self.log(f"gym check: batch {self._batch} ready in {stack.startup_s:.0f}s")
        try:
            results = asyncio.run(self._roll(stack, envs))
        finally:
            left = stack.stop()
        if left:  # megagym's teardown left processes: that is megagym's failure, not Gym's
            for r in results:
                r.outcome, r.reason = "failed-megagym", f"processes left after stop: {'; '.join(left)[:200]}"
        log_text = _read(rd / "gym.log")
        for env, r in zip(envs, results):
            if r.outcome == "failed-gym" and r.reason.startswith("rollouts failed"):
                why = log_reason(log_text, env.instance_names(), env.server)
                if why:  # Gym's own exception says more than the agent's HTTP status
                    r.reason = f"Gym: {why} ({r.reason[len('rollouts failed: '):][:80]}…)"
                elif "calling an inner server" in r.reason:
                    r.reason += f" (the inner server's answer: `(policy_model)` lines of {rd / 'gym.log'})"
        # a stack killed by one environment's dead server fails the others too: run them again alone
        victims = [e for e, r in zip(envs, results) if r.outcome == "failed-gym" and "gym server dead" in r.reason]
        if retry and victims and len(envs) > 1:
            again = {e.name: r for e in victims for r in self.run_batch([e], retry=False)}
            results = [again.get(r.env, r) for r in results]
        return results

    async def _roll(self, stack, envs: list[GymEnv]) -> list[CheckResult]:
        from megagym.gym.rows import load_env_rows
        from megagym.rollout import RolloutManager

        manager = RolloutManager(self.rollout, stack)
        sem = asyncio.Semaphore(self.rollout.max_concurrency)
        async with manager.client() as client:
            return list(await asyncio.gather(*[self._roll_env(manager, client, sem, e, load_env_rows)
                                               for e in envs]))

    async def _roll_env(self, manager, client, sem, env: GymEnv, load_env_rows) -> CheckResult:
        from megagym.rollout.metrics import RolloutMetrics
        from megagym.rollout.trajectory import ContiguityError

        t0 = time.monotonic()
        res = CheckResult(env.name, env.agent, "failed-gym")
        try:
            rows = load_env_rows(GymConfig(environments=[env.name], definitions={env.name: env.definition()},
                                           catalog_dirs=[], venv=self.venv))
        except Exception as e:  # a data file megagym cannot read
            res.outcome, res.reason = "failed-megagym", f"rows: {type(e).__name__}: {e}"
            return res
        res.rows = len(rows)
        foreign = sorted({r["agent_ref"]["name"] for r in rows} - set(manager.agents))
        if foreign:
            res.reason = f"example rows route to agents the config does not define: {', '.join(foreign)}"
            return res
        metrics = RolloutMetrics()
        rewards, failures, broken = [], collections.Counter(), []

        async def one(i, row):
            try:
                g = await manager.run_group(client, sem, row, i, metrics)
            except ContiguityError as e:
                broken.append(str(e))
                return
            except Exception as e:  # anything else escaping megagym's rollout path is megagym's
                failures[f"megagym: {type(e).__name__}: {e}"] += 1
                return
            rewards.extend(s.reward for s in g.samples)
            for f in g.failures:
                failures[_short_failure(f)] += 1

        await asyncio.gather(*[one(i, r) for i, r in enumerate(rows)])
        res.rollouts = len(rows) * self.rollout.n
        res.samples = len(rewards)
        res.contiguity = (not broken) if (rewards or broken) else None
        if rewards:
            res.reward_min, res.reward_max = min(rewards), max(rewards)
        res.seconds = time.monotonic() - t0
        megagym_side = [f for f in failures if f.startswith("megagym:")]
        if broken:
            res.outcome, res.reason = "failed-megagym", f"contiguity broken ({len(broken)}): {broken[0][:200]}"
        elif megagym_side:
            res.outcome, res.reason = "failed-megagym", megagym_side[0][:300]
        elif rewards:
            res.outcome = "ran"
            if failures:
                res.reason = f"{sum(failures.values())} rollouts failed: " + _top(failures)
        else:
            res.reason = "rollouts failed: " + _top(failures)
        return res


def _short_failure(text: str) -> str:
    """One line of a manager failure reason (Gym's HTTP bodies can be long)."""
    text = " ".join(text.split())
    return text[:200]


def _top(c: collections.Counter) -> str:
    (text, k), *rest = c.most_common()
    return f"{text} (x{k})" + (f" (+{len(rest)} other reasons)" if rest else "")


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def batches(envs: list[GymEnv], size: int) -> list[list[GymEnv]]:
    """Consecutive groups of at most `size` whose configs define no instance name twice."""
    out: list[list[GymEnv]] = []
    cur: list[GymEnv] = []
    names: set[str] = set()
    for e in envs:
        inst = e.instance_names() - {POLICY}
        if cur and (len(cur) >= size or inst & names):
            out.append(cur)
            cur, names = [], set()
        cur.append(e)
        names |= inst
    if cur:
        out.append(cur)
    return out


# ----------------------------------------------------------------------------------- report

HEADER = ["environment", "agent", "rows", "samples", "contiguity", "reward", "outcome", "reason"]


def counts(results: list[CheckResult]) -> dict[str, int]:
    c = collections.Counter(r.outcome for r in results)
    return {k: c.get(k, 0) for k in OUTCOMES}


def table(results: list[CheckResult]) -> str:
    """A plain-text table (terminal)."""
    rows = [HEADER] + [r.row() for r in results]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]
    return "\n".join(lines)


def markdown(results: list[CheckResult]) -> str:
    def esc(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(esc(c) for c in r.row()) + " |" for r in results]
    return "\n".join(lines)


def report(results: list[CheckResult], version: str, wall_s: float, command: str) -> str:
    """The markdown of a sweep: command, Gym version, counts, wall-clock, the lists, the table."""
    c = counts(results)
    by = {k: [r.env for r in results if r.outcome == k] for k in OUTCOMES}
    lines = ["# `megagym gym check`: Gym's environments through megagym's rollout path", "",
             "Each environment Gym ships (a resources server with a config and `data/example.jsonl`) is "
             "classified from its files; those that need nothing beyond the policy model are started from "
             "Gym's own config file as inline `env.definitions` (the training path: GymStack, "
             "RolloutManager, trajectory_to_sample) and their example rows are rolled out once each. "
             "Packages an environment lacks are installed into Gym's venv with "
             "`megagym gym check --install ENV`. Written by `megagym/gym/check.py`; see the README section "
             "\"Gym environments and rollouts\".", "",
             f"Command: `{command}`  ", f"NeMo Gym {version}; {len(results)} environments; wall-clock "
             f"{wall_s / 60:.1f} min (2-core CPU, tiny random Qwen3 policy).", "",
             "| outcome | count | meaning |", "|---|---|---|",
             f"| ran | {c['ran']} | samples built through RolloutManager, contiguity held |",
             f"| needs | {c['needs']} | not started: the config needs more than the policy model (reason given) |",
             f"| failed-gym | {c['failed-gym']} | started or tried; failed for a reason Gym or the environment names |",
             f"| failed-megagym | {c['failed-megagym']} | failed in megagym's path (must be 0) |", ""]
    for k in OUTCOMES:
        lines.append(f"**{k}** ({len(by[k])}): " + (", ".join(by[k]) or "none"))
        lines.append("")
    lines.append(markdown(results))
    return "\n".join(lines) + "\n"


def to_json(results: list[CheckResult]) -> list[dict]:
    return [asdict(r) for r in results]


def all_environments(gym_root: Path) -> list[GymEnv]:
    installed = installed_distributions(gym_root)
    out = []
    for name in shipped(gym_root):
        sdir = gym_root / "resources_servers" / name
        out.append(classify(GymEnv(name=name, config=default_config(sdir)), gym_root, installed))
    return out


def gym_root_of(venv: str = ".venv-gym") -> Path:
    return gym_install_root(venv)


# ------------------------------------------------------------------------------- the command

def select(names: list[str], every: bool, gym_root: Path) -> list[GymEnv]:
    """The environments a `gym check` names (`--all`: every one Gym ships, default configs)."""
    if every:
        return all_environments(gym_root)
    if not names:
        raise ConfigError("gym check: name at least one environment, or --all (--list shows them)")
    return [lookup(n, gym_root) for n in names]


def tiny_policy(run_dir: Path, max_model_len: int):
    """A started `megagym serve` on a fresh tiny random Qwen3 whose context is `max_model_len`."""
    from megagym.server.process import ServerProcess
    from megagym.testing.tiny_qwen3 import write_tiny_qwen3

    model = write_tiny_qwen3(run_dir / "tiny_qwen3", seed=0, max_position_embeddings=max_model_len)
    server = ServerProcess(str(model), overrides=[f"max_model_len={max_model_len}", "kv_cache_gib=1"],
                           log_path=run_dir / "serve.log")
    try:
        return server.start(timeout_s=300)
    except BaseException:  # SIGTERM / Ctrl-C while it starts: do not leave the engine behind
        server.stop()
        raise


def run_check(envs: list[GymEnv], run_dir: Path, *, policy_url: str = "", max_model_len: int = 16384,
              batch_size: int = 8, n: int = 1, max_output_tokens: int = 32, request_timeout_s: float = 180.0,
              start_timeout_s: float = 600.0, venv: str = ".venv-gym", log=print) -> list[CheckResult]:
    """Results for `envs` in their order: `needs` ones from their files, the rest run in batches
    on the policy server at `policy_url` (or on a tiny random Qwen3 started for the check)."""
    from megagym.gym.model_name import model_name_of

    run_dir.mkdir(parents=True, exist_ok=True)
    results = {e.name: needs_result(e) for e in envs if e.needs}
    runnable = [e for e in envs if not e.needs]
    server = None
    if runnable:
        if not policy_url:
            log(f"gym check: starting a policy server on a tiny random Qwen3 (max_model_len {max_model_len})")
            server = tiny_policy(run_dir, max_model_len)
            policy_url = f"{server.base_url}/v1"
        try:
            checker = Checker(policy_url, model_name_of(policy_url), run_dir, n=n, max_output_tokens=max_output_tokens,
                              request_timeout_s=request_timeout_s, start_timeout_s=start_timeout_s, venv=venv, log=log)
            for r in checker.run(runnable, batch_size):
                results[r.env] = r
        finally:
            if server is not None:
                server.stop()
    return [results[e.name] for e in envs]


def main(a) -> int:
    """`megagym gym check` (arguments parsed by megagym/gym/cli.py)."""
    t0 = time.monotonic()
    try:
        root = gym_root_of(a.venv)
        if a.list:
            for e in all_environments(root):
                print(f"{e.name:<46} {'runs on the policy alone' if not e.needs else '; '.join(e.needs)}")
            return 0
        envs = select(a.envs, a.all, root)
    except ConfigError as e:
        print(f"megagym {e}" if str(e).startswith("gym check") else f"megagym gym check: {e}", file=sys.stderr)
        return 2
    if a.install:
        rc = 0
        for e in envs:
            if e.missing:
                rc = rc or install_requirements(e.missing, a.venv)
            else:
                print(f"megagym gym check: {e.name}: Gym's venv has every package it lists")
        if rc:
            return rc
        envs = [lookup(e.name, root) for e in envs]  # again, with what is installed now
    results = run_check(envs, Path(a.run_dir).resolve(), policy_url=a.policy_url, max_model_len=a.max_model_len,
                        batch_size=a.batch_size, n=a.n, max_output_tokens=a.max_output_tokens,
                        request_timeout_s=a.request_timeout_s, start_timeout_s=a.start_timeout_s, venv=a.venv,
                        log=lambda m: print(m, flush=True))
    wall = time.monotonic() - t0
    if a.update:  # re-checked environments replace their rows in an earlier sweep's results
        prev = json.loads(Path(a.update).read_text())
        fresh = {r.env: r for r in results}
        merged = [fresh.pop(d["env"], None) or CheckResult(**d) for d in prev["results"]]
        results, wall = merged + list(fresh.values()), prev["wall_s"] + wall
        a.json = a.json or a.update
    print(table(results))
    c = counts(results)
    print(f"\nGym {gym_version(root)}: {len(results)} environments: " + ", ".join(f"{k} {v}" for k, v in c.items())
          + f"; {wall:.0f}s")
    if a.markdown:
        Path(a.markdown).write_text(report(results, gym_version(root), wall, a.command or "megagym gym check"))
    if a.json:
        Path(a.json).write_text(json.dumps({"gym_version": gym_version(root), "wall_s": round(wall, 1),
                                            "counts": c, "results": to_json(results)}, indent=1))
    return 1 if c["failed-megagym"] else 0
