#!/usr/bin/env bash
# One command on one machine (a laptop, a workstation, a single GPU node):
#   bash launch/local.sh [CONFIG] [key=value ...] [--resume] [--nproc N]
# builds the CPU stack if needed (scripts/setup.sh is idempotent), then runs `megagym train` on
# CONFIG (default: the embedded CPU demo, configs/tiny_cpu.yaml). `megagym train` starts the policy
# servers, Gym and the trainer ranks itself, stops them on exit, error or signal, and writes
# RUN_DIR/metrics.jsonl and RUN_DIR/plots/. Arguments reach `megagym train` unchanged.
# Clusters use slurm/ instead.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ $# -eq 0 ]; then
  set -- configs/tiny_cpu.yaml
fi
exec .venv/bin/megagym train "$@"
