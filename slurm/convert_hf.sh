#!/usr/bin/env bash
#SBATCH --job-name=megagym-convert
#SBATCH --output=slurm-%x-%j.out
#SBATCH --nodes=1
#SBATCH --ntasks=1
# Megatron (megagym) checkpoint -> HF folder, in one process on one node (no GPU needed):
#   sbatch slurm/convert_hf.sh CKPT OUT
# CKPT: a checkpoint folder (<run>/checkpoints/step_XXXXXXXX), or a run folder / checkpoints folder
# (its latest complete checkpoint). OUT: the HF folder to create (must not exist).
# Variables: MEGAGYM_CKPT / MEGAGYM_HF_OUT instead of the arguments; MEGAGYM_REPO, MEGAGYM_VENV,
# MEGAGYM_CONTAINER_IMAGE, ... as in slurm/common.sh.
set -euo pipefail
MG_SCRIPT=convert
# shellcheck source=slurm/common.sh
source "${MEGAGYM_REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}/slurm/common.sh"
mg_init
CKPT=${1:-${MEGAGYM_CKPT:-}}
OUT=${2:-${MEGAGYM_HF_OUT:-}}
[ -n "$CKPT" ] && [ -n "$OUT" ] || mg_die "usage: sbatch slurm/convert_hf.sh CKPT OUT (or MEGAGYM_CKPT / MEGAGYM_HF_OUT)"
if [ ! -f "$CKPT/COMPLETE" ]; then  # a run or checkpoints folder: its latest complete checkpoint
  root=$CKPT
  [ -d "$CKPT/checkpoints" ] && root=$CKPT/checkpoints
  CKPT=$(mg_py -c 'import sys; from megagym.trainer.checkpoint import latest_checkpoint; print(latest_checkpoint(sys.argv[1]) or "")' "$root")
  [ -n "$CKPT" ] || mg_die "no complete checkpoint under $root"
fi
mg_log "converting $CKPT -> $OUT"
mg_py -m megagym.cli convert --to-hf "$CKPT" "$OUT"
mg_log "done: $OUT"
