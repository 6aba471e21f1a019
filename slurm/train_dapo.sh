#!/usr/bin/env bash
#SBATCH --job-name=megagym-dapo
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@180
# Benchmark 1: GRPO on DAPO17k, validated on AIME24 (pass@1 over 32 samples), Qwen3-4B-Instruct-2507.
#   sbatch -N 2 --gpus-per-node=8 --time=04:00:00 slurm/train_dapo.sh [key=value ...]
#   (repeat with --dependency=singleton to chain jobs; each resumes from the last checkpoint)
# Variables: MEGAGYM_CONFIG [configs/dapo17k_qwen3_4b.yaml], MEGAGYM_MODEL (HF folder of
# Qwen3-4B-Instruct-2507) and every variable of slurm/train.sh and slurm/common.sh.
# Data: data/dapo17k/train.jsonl and data/aime24/validation.jsonl (`megagym data prepare dapo17k`
# and `... aime24` on a machine with hub access).
set -euo pipefail
export MEGAGYM_CONFIG=${MEGAGYM_CONFIG:-configs/dapo17k_qwen3_4b.yaml}
exec bash "${MEGAGYM_REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}/slurm/train.sh" "$@"
