#!/usr/bin/env bash
# The trainer's GPU checks in one prepared run (< 10 minutes on one H100/H200) for a session that
# is lent a GPU machine: torch + transformers are there; megatron-core is not, so it comes as a
# carried wheel (~2 MB; DESIGN.md "What a lent GPU machine can and cannot check").
#
# Prepare the wheel on this machine once, for the device's Python (ask it first: `python -V`; the
# cp312 wheel is 2.6 MB):
#   /work/main/.venv/bin/python -m pip download --no-deps megatron-core==0.16.1 \
#       --python-version 3.12 --only-binary=:all: -d bench/wheels
# then, through the device tool, from the repository root (bench/wheels is untracked, so carry it):
#   bash bench/gpu_check.sh "$OUT"            # carry: ["bench/wheels"], timeout_s 600
#
# Parts (each its own process, each bounded): bf16 Megatron vs transformers logprobs; the memory
# plan vs torch.cuda.max_memory_allocated on two configs; packed vs padded tokens/s. Results are
# printed and written as JSON under the output folder (default ./gpu_check_out).
set -uo pipefail
OUT="${1:-gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
WHEELS="${MEGAGYM_WHEELS:-bench/wheels}"
if ! "$PY" -c "import megatron.core" 2>/dev/null; then
    ls "$WHEELS"/megatron_core-*.whl >/dev/null 2>&1 || { echo "no megatron-core wheel in $WHEELS (see the header)"; exit 2; }
    "$PY" -m pip install --quiet --no-deps --no-index "$WHEELS"/megatron_core-*.whl || exit 2
fi
"$PY" - <<'EOF'
import torch, transformers, megatron.core
print(f"torch {torch.__version__}, transformers {transformers.__version__}, megatron-core {megatron.core.__version__}, "
      f"{torch.cuda.get_device_name(0)}")
EOF
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONWARNINGS=ignore TOKENIZERS_PARALLELISM=false
status=0
for part in logprobs memory packing; do
    echo "== $part"
    timeout 180 "$PY" bench/gpu_check.py "$part" --out "$OUT" 2>"$OUT/$part.err"
    rc=$?
    if [ "$rc" -ne 0 ]; then
        status=1; echo "$part failed (rc $rc); last lines of $OUT/$part.err:"; tail -20 "$OUT/$part.err"
    fi
done
exit $status
