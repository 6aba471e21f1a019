"""HF <-> Megatron weights: loading, streamed export, conversion.

The name/layout maps live with each model family (`megagym/models/<family>/weights.py`, found
through the `megagym.models` registry); `load.py` reads HF safetensors into a shard, `export.py` streams full HF-named tensors from a sharded
model, `convert.py` is `megagym convert --to-hf`. `sync/` (weight transfer into vLLM) belongs to
the weight-sync owner and consumes `export.py`.
"""
