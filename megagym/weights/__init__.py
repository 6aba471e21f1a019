"""HF <-> Megatron weight maps (one module per architecture family), streamed export, conversion.

`families/` holds the name/layout maps, `export.py` streams full HF-named tensors from a sharded
model, `convert.py` is `megagym convert --to-hf`. `sync/` (weight transfer into vLLM) belongs to
the weight-sync owner and consumes `export.py`.
"""
