#!/usr/bin/env bash
# The Gym conformance sweep (issue #15): every environment Gym ships, through megagym's rollout
# path, on one tiny random Qwen3 policy server; environments whose configs need more than the
# policy model (judges, containers, API keys, missing packages) are reported, not started.
# Writes docs/gym_check.md (linked from the README) and runs/gym_check/sweep.json; Gym's logs of
# each batch stay in runs/gym_check/batchNNN/gym.log. Not a CI test (~20 min on 2 CPU cores);
# CI runs a small sample (tests/gym/test_check.py).
# Usage: bash scripts/gym_check_sweep.sh [extra `megagym gym check` options]
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs/gym_check
.venv/bin/python -m megagym.cli gym check --all --run-dir runs/gym_check --json runs/gym_check/sweep.json \
  --markdown docs/gym_check.md --command "bash scripts/gym_check_sweep.sh" "$@" 2>&1 | tee runs/gym_check/sweep.log
