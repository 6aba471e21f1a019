#!/usr/bin/env bash
# slurm/component.sh COMMAND...: what every megagym job step runs — activate the venv, enter the
# repository, then exec COMMAND (srun's per-task environment, SLURM_PROCID etc., passes through).
#   MEGAGYM_REPO   repository root [the folder above this script]
#   MEGAGYM_VENV   venv to activate; empty = use the python on PATH (a container's) [$MEGAGYM_REPO/.venv]
set -euo pipefail
MEGAGYM_REPO=${MEGAGYM_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
cd "$MEGAGYM_REPO"
venv=${MEGAGYM_VENV-$MEGAGYM_REPO/.venv}
if [ -n "$venv" ]; then
  [ -x "$venv/bin/python" ] || { echo "component.sh: no python in MEGAGYM_VENV=$venv" >&2; exit 1; }
  export VIRTUAL_ENV=$venv PATH="$venv/bin:$PATH"
fi
export PYTHONUNBUFFERED=1
exec "$@"
