#!/usr/bin/env bash
#SBATCH --job-name=megagym-workplace
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@180
# Benchmark 2: GRPO on the workplace assistant (multi-step tool calling), Qwen3-4B-Instruct-2507.
#   sbatch -N 2 --gpus-per-node=8 --time=04:00:00 slurm/train_workplace.sh [key=value ...]
#   (repeat with --dependency=singleton to chain jobs; each resumes from the last checkpoint)
# Variables: MEGAGYM_CONFIG [configs/workplace_assistant_qwen3_4b.yaml], MEGAGYM_MODEL (HF folder of
# Qwen3-4B-Instruct-2507) and every variable of slurm/train.sh and slurm/common.sh.
# Data: data/workplace_assistant/{train,validation}.jsonl (`megagym data prepare workplace_assistant`).
set -euo pipefail
export MEGAGYM_CONFIG=${MEGAGYM_CONFIG:-configs/workplace_assistant_qwen3_4b.yaml}
exec bash "${MEGAGYM_REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}/slurm/train.sh" "$@"
