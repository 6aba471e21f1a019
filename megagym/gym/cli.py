"""`megagym gym start|stop CONFIG [key=value ...]`: run the Gym stack of a run configuration;
`megagym gym check [ENV ...] [--all]`: do Gym's own environments yield samples through megagym?

Owns: the command line around `GymStack`. `start` composes and starts Gym from the config's
`env:` section, waits until every server is up, prints the agents, then stays in the foreground
until Ctrl-C / SIGTERM and stops everything (or, with `--detach`, leaves the stack running and
returns). `stop` stops a detached stack from the state file in its run directory. The policy
servers' URLs come from `env.policy_base_urls` (set them in the YAML or as an override).
`check` parses its arguments here and runs in `check.py`.
Must not: start policy servers or training.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from megagym.config.loader import ConfigError, load


def _load(config: str, overrides: list[str]):
    from megagym.config.schema import RunConfig

    cfg = load(RunConfig, config, overrides)
    env = cfg.env
    run_dir = Path(env.run_dir) if env.run_dir else Path(cfg.run.output_dir) / "gym"
    return env, run_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="megagym gym", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    ps = sub.add_parser("start", help="start the Gym servers of CONFIG's env: section")
    ps.add_argument("config")
    ps.add_argument("overrides", nargs="*", help="dotted overrides, e.g. env.policy_base_urls=[http://...]")
    ps.add_argument("--detach", action="store_true", help="return once ready; stop later with `gym stop`")
    pt = sub.add_parser("stop", help="stop a detached Gym stack of CONFIG")
    pt.add_argument("config")
    pt.add_argument("overrides", nargs="*")
    pc = sub.add_parser("check", help="run Gym environments' example rows through megagym's rollout path")
    pc.add_argument("envs", nargs="*", help="resources servers Gym ships (`server` or `server:config`)")
    pc.add_argument("--all", action="store_true", help="every environment Gym ships")
    pc.add_argument("--list", action="store_true", help="list them with what each needs, start nothing")
    pc.add_argument("--install", action="store_true",
                    help="first pip-install the named environments' missing packages into Gym's venv")
    pc.add_argument("--policy-url", default="", help="an existing policy server (…/v1); default: start "
                    "`megagym serve` on a tiny random Qwen3")
    pc.add_argument("--max-model-len", type=int, default=16384, help="context of the tiny policy")
    pc.add_argument("--batch-size", type=int, default=8, help="environments per Gym stack")
    pc.add_argument("--n", type=int, default=1, help="rollouts per example row")
    pc.add_argument("--max-output-tokens", type=int, default=32)
    pc.add_argument("--request-timeout-s", type=float, default=180.0)
    pc.add_argument("--start-timeout-s", type=float, default=600.0, help="bound on one Gym stack's start")
    pc.add_argument("--run-dir", default="runs/gym_check", help="Gym logs of each batch, the policy's log")
    pc.add_argument("--json", default="", help="also write the results here")
    pc.add_argument("--markdown", default="", help="also write a markdown report here")
    pc.add_argument("--update", default="", help="an earlier --json: replace the named environments' "
                    "results there (and in --markdown), keep the rest")
    pc.add_argument("--command", default="", help="the command line the markdown report names")
    pc.add_argument("--venv", default=".venv-gym", help="Gym's venv")
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "check":
        from megagym.gym import check

        return check.main(p.parse_args(argv))
    a, extra = p.parse_known_args(argv)  # overrides may follow an option such as --detach
    if any("=" not in e or e.startswith("-") for e in extra):
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    a.overrides = list(a.overrides) + extra

    from megagym.gym.errors import GymError
    from megagym.gym.stack import GymStack, stop_from_state

    try:
        env, run_dir = _load(a.config, a.overrides)
        if a.cmd == "stop":
            left = stop_from_state(run_dir, env.stop_timeout_s)
            if left:
                print("megagym gym stop: still alive:\n  " + "\n  ".join(left), file=sys.stderr)
                return 1
            print(f"megagym gym stop: stopped the Gym stack of {run_dir}")
            return 0
        t0 = time.monotonic()
        stack = GymStack.start(env, run_dir=run_dir)
    except (ConfigError, GymError) as e:
        print(f"megagym gym {a.cmd}: {e}", file=sys.stderr)
        return 2
    print(f"megagym gym start: ready in {time.monotonic() - t0:.1f}s; head server {stack.head_url}; "
          f"log {stack.plan.log_file}")
    for agent, url in sorted(stack.agents.items()):
        env_name = stack.agent_to_env.get(agent, "-")
        print(f"  {env_name:<28} {agent:<40} {url}/run")
    if a.detach:
        import atexit

        atexit.unregister(stack.stop)
        print(f"detached; stop with: megagym gym stop {a.config} {' '.join(a.overrides)}".rstrip())
        return 0
    try:
        while True:
            dead = stack.dead_servers()
            if dead:
                print("megagym gym: Gym servers died: " + "; ".join(f"{k}: {v}" for k, v in dead.items()),
                      file=sys.stderr)
                return 1
            time.sleep(2.0)
    except (KeyboardInterrupt, SystemExit):
        return 0
    finally:
        left = stack.stop()
        if left:
            print("megagym gym: still alive after stop:\n  " + "\n  ".join(left), file=sys.stderr)
        else:
            print("megagym gym: stopped; no process of the stack is left")
