#!/usr/bin/env bash
#SBATCH --job-name=megagym-eval
#SBATCH --output=slurm-%x-%A_%a.out
#SBATCH --nodes=1
# Evaluate many checkpoints on a validation set, one job-array task per checkpoint, then merge.
#
#   bash slurm/eval_array.sh CKPT_OR_FOLDER...          (on the login node: submits both jobs)
#     each argument is a checkpoint (or HF) folder, or a checkpoints/run folder (all its step_*);
#     writes $MEGAGYM_EVAL_DIR/checkpoints.txt, submits the array (one task per line) and a merge
#     job that runs after it (--dependency=afterany). Extra sbatch arguments for both (partition,
#     --gpus-per-node=8, --time, ...) come from MEGAGYM_SBATCH_ARGS (whitespace-separated).
#   Or by hand: sbatch --array=0-N --export=ALL,MEGAGYM_CHECKPOINTS=list.txt slurm/eval_array.sh
#               sbatch --dependency=afterany:ARRAY_ID --export=ALL,MEGAGYM_EVAL_MERGE=1 slurm/eval_array.sh
#
# Array task i evaluates line i+1 of MEGAGYM_CHECKPOINTS with `megagym eval` (converts a megagym
# checkpoint to HF, starts the config's policy server(s) and Gym on its node, samples val.n
# answers per validation prompt) and writes $MEGAGYM_EVAL_DIR/result_<i>.json; logs of its servers
# and Gym under $MEGAGYM_EVAL_DIR/work_<i>/logs. The merge job writes summary.{md,csv,png}.
# Benchmarks: AIME24 pass@1 over 32 samples = MEGAGYM_CONFIG=configs/dapo17k_qwen3_4b.yaml (val.n 32);
# workplace assistant validation = MEGAGYM_CONFIG=configs/workplace_assistant_qwen3_4b.yaml.
#
# Variables (defaults in brackets); MEGAGYM_REPO, MEGAGYM_VENV, MEGAGYM_CONTAINER_* as in slurm/common.sh:
#   MEGAGYM_CONFIG       run YAML whose env/validation/sampling settings are used [required]
#   MEGAGYM_OVERRIDES    key=value overrides, whitespace-separated (e.g. "val.n=32 servers.count=8")
#   MEGAGYM_EVAL_DIR     results folder [eval/<config name>]
#   MEGAGYM_CHECKPOINTS  file with one checkpoint folder per line [$MEGAGYM_EVAL_DIR/checkpoints.txt]
#   MEGAGYM_EVAL_MERGE   1: this job is the merge step
#   MEGAGYM_SBATCH_ARGS  extra sbatch arguments used by the submit mode
#   MEGAGYM_ARRAY_LIMIT  at most this many array tasks at once (--array=0-N%LIMIT) [no limit]
set -euo pipefail
MG_SCRIPT=eval
# shellcheck source=slurm/common.sh
source "${MEGAGYM_REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}/slurm/common.sh"
mg_init
CONFIG=${MEGAGYM_CONFIG:?set MEGAGYM_CONFIG (e.g. configs/dapo17k_qwen3_4b.yaml)}
EVAL_DIR=${MEGAGYM_EVAL_DIR:-eval/$(basename "$CONFIG" .yaml)}
EVAL_DIR=$(mkdir -p "$EVAL_DIR" && cd "$EVAL_DIR" && pwd)
LIST=${MEGAGYM_CHECKPOINTS:-$EVAL_DIR/checkpoints.txt}
read -r -a OVERRIDES <<< "${MEGAGYM_OVERRIDES:-}"

if [ -z "${SLURM_JOB_ID:-}" ]; then  # ------------------------------------- submit mode
  [ $# -gt 0 ] || mg_die "usage: bash slurm/eval_array.sh CKPT_OR_FOLDER..."
  : > "$LIST"
  for arg in "$@"; do
    dir=$(cd "$arg" && pwd) || mg_die "$arg is not a folder"
    [ -d "$dir/checkpoints" ] && dir=$dir/checkpoints
    if [ -f "$dir/COMPLETE" ] || [ -f "$dir/config.json" ]; then echo "$dir" >> "$LIST"
    else find "$dir" -maxdepth 1 -name 'step_*' -type d | sort >> "$LIST"; fi
  done
  n=$(grep -c . "$LIST" || true)
  [ "$n" -gt 0 ] || mg_die "no checkpoints found in: $*"
  read -r -a SB <<< "${MEGAGYM_SBATCH_ARGS:-}"
  export MEGAGYM_REPO MEGAGYM_CONFIG MEGAGYM_EVAL_DIR=$EVAL_DIR MEGAGYM_CHECKPOINTS=$LIST
  array=$(sbatch --parsable "${SB[@]}" --array="0-$((n - 1))${MEGAGYM_ARRAY_LIMIT:+%$MEGAGYM_ARRAY_LIMIT}" --output="$EVAL_DIR/slurm-%A_%a.out" \
    "$MEGAGYM_REPO/slurm/eval_array.sh")
  array=${array%%;*}
  merge=$(MEGAGYM_EVAL_MERGE=1 sbatch --parsable "${SB[@]}" --dependency="afterany:$array" \
    --job-name=megagym-eval-merge --output="$EVAL_DIR/slurm-merge-%j.out" "$MEGAGYM_REPO/slurm/eval_array.sh")
  mg_log "submitted array job $array ($n checkpoints from $LIST) and merge job ${merge%%;*}; results in $EVAL_DIR"
  echo "$array ${merge%%;*}"
  exit 0
fi

if [ "${MEGAGYM_EVAL_MERGE:-0}" = 1 ]; then  # ------------------------------ merge step
  mg_log "merging $EVAL_DIR/result_*.json"
  mg_py -m megagym.cli eval-merge "$EVAL_DIR" --out "$EVAL_DIR/summary"
  exit 0
fi

i=${SLURM_ARRAY_TASK_ID:?run as a job array (sbatch --array=...) or in submit mode}
CKPT=$(sed -n "$((i + 1))p" "$LIST")
[ -n "$CKPT" ] || mg_die "no line $((i + 1)) in $LIST"
mg_log "task $i: $CKPT ($CONFIG)"
mg_srun --nodes=1 --ntasks=1 --nodelist="${MG_NODES[0]}" -- \
  python -m megagym.cli eval "$CONFIG" "${OVERRIDES[@]}" "rollout.progress=false" --checkpoint "$CKPT" \
  --out "$EVAL_DIR/result_$i.json" --work-dir "$EVAL_DIR/work_$i"
mg_log "task $i: wrote $EVAL_DIR/result_$i.json"
