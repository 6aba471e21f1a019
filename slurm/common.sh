# shellcheck shell=bash
# slurm/common.sh — shared shell of megagym's batch scripts; sourced, never run on its own.
#
# Variables (all optional; defaults in brackets):
#   MEGAGYM_REPO              repository root on a filesystem every node sees
#                             [$SLURM_SUBMIT_DIR: submit from the repository root]
#   MEGAGYM_VENV              venv holding megagym (activated in every step) [$MEGAGYM_REPO/.venv;
#                             with a container: none, the container's python]
#   MEGAGYM_CONTAINER_IMAGE   run every step inside this image (pyxis: srun --container-image) [none]
#   MEGAGYM_CONTAINER_MOUNTS  its --container-mounts ["$MEGAGYM_REPO:$MEGAGYM_REPO"]
#   MEGAGYM_SRUN_ARGS         extra srun arguments for every step, whitespace-separated [none]
#
# Provides: mg_init (node list, cd to the repo), mg_log, mg_srun (a step, overlapping the others,
# in the container if any), mg_py (a Python module run on the batch node, e.g. megagym helpers),
# and MG_NODES (the job's host names, first = batch node).

mg_log() { printf '[%s megagym %s] %s\n' "$(date -u +%H:%M:%S)" "${MG_SCRIPT:-slurm}" "$*"; }
mg_die() { mg_log "error: $*" >&2; exit 1; }

mg_init() {
  MEGAGYM_REPO=${MEGAGYM_REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}
  [ -f "$MEGAGYM_REPO/slurm/component.sh" ] || mg_die "MEGAGYM_REPO=$MEGAGYM_REPO is not a megagym checkout (submit from the repository root or set MEGAGYM_REPO)"
  cd "$MEGAGYM_REPO"
  export MEGAGYM_REPO
  if [ -n "${MEGAGYM_CONTAINER_IMAGE:-}" ]; then
    export MEGAGYM_VENV=${MEGAGYM_VENV:-}
    MG_CONTAINER=(--container-image="$MEGAGYM_CONTAINER_IMAGE"
                  --container-mounts="${MEGAGYM_CONTAINER_MOUNTS:-$MEGAGYM_REPO:$MEGAGYM_REPO}"
                  --container-workdir="$MEGAGYM_REPO")
  else
    export MEGAGYM_VENV=${MEGAGYM_VENV-$MEGAGYM_REPO/.venv}
    MG_CONTAINER=()
  fi
  read -r -a MG_SRUN_EXTRA <<< "${MEGAGYM_SRUN_ARGS:-}"
  if [ -n "${SLURM_JOB_NODELIST:-}" ]; then
    mapfile -t MG_NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  else
    MG_NODES=("$(hostname)")
  fi
  export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
}

# mg_srun SRUN_ARGS... -- COMMAND...: one job step through slurm/component.sh (venv, cwd, env).
mg_srun() {
  local args=()
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do args+=("$1"); shift; done
  shift
  srun --overlap "${MG_CONTAINER[@]}" "${MG_SRUN_EXTRA[@]}" "${args[@]}" \
    bash "$MEGAGYM_REPO/slurm/component.sh" "$@"
}

# mg_py ARGS...: `python ARGS...` on the batch node (directly with a venv, as a step in a container).
mg_py() {
  if [ ${#MG_CONTAINER[@]} -gt 0 ]; then
    mg_srun --nodes=1 --ntasks=1 --nodelist="${MG_NODES[0]}" -- python "$@"
  else
    bash "$MEGAGYM_REPO/slurm/component.sh" python "$@"
  fi
}
