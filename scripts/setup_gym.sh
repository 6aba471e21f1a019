#!/usr/bin/env bash
# Build NeMo Gym's own venv, .venv-gym/ (Python 3.13.0 from pyenv, nemo-gym 0.7.0 and the
# requirements of every environment megagym ships configs for), from requirements/gym.lock.txt.
#
# megagym never imports nemo_gym: Gym runs as a service (`gym env start`) from this venv. At start
# megagym points Gym's per-server venv lookup (`uv_venv_dir` + `skip_venv_if_present`) at links to
# this one venv, so starting Gym needs no network and no `uv`.
# Idempotent: a stamp of the lock file (and this script) skips work that is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

GYM_PY_VERSION=3.13.0
LOCK=requirements/gym.lock.txt
VENV=.venv-gym
STAMP=$VENV/.megagym-gym-stamp
want=$(cat "$LOCK" scripts/setup_gym.sh | sha256sum | cut -c1-16)

find_python313() {
  local c
  for c in "${MEGAGYM_GYM_PYTHON:-}" "$HOME/.pyenv/versions/$GYM_PY_VERSION/bin/python3.13" \
           "$(command -v python3.13 2>/dev/null || true)"; do
    [ -n "$c" ] && [ -x "$c" ] && { echo "$c"; return 0; }
  done
  return 1
}

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  echo "setup_gym: $VENV is up to date"
  exit 0
fi

PY313=$(find_python313) || {
  echo "setup_gym: Python 3.13 not found (pyenv install $GYM_PY_VERSION, or set MEGAGYM_GYM_PYTHON)" >&2
  exit 1
}
echo "setup_gym: building $VENV with $PY313"
start=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PY313" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# nemo-gym 0.7.0 declares Requires-Python >=3.13.14; it runs on 3.13.0 (the newest pyenv has here).
# Exact pins, no resolver: the lock is a freeze of a working venv.
"$VENV/bin/python" -m pip install -q --no-deps --ignore-requires-python -r "$LOCK"
"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
import math_verify, nemo_gym, pandas, ray, reasoning_gym  # noqa: F401  (the environments' imports)
print("setup_gym: nemo-gym", md.version("nemo-gym"), "ray", ray.__version__)
EOF
[ -x "$VENV/bin/gym" ] || { echo "setup_gym: $VENV/bin/gym missing after install" >&2; exit 1; }
echo "$want" > "$STAMP"
echo "setup_gym: done in $(( $(date +%s) - start ))s ($(pwd)/$VENV)"
