"""Helpers shared by tests and benchmarks: tiny random checkpoints (`tiny_qwen3.py`) and the
test-only vLLM app with the weight-sync routes (`vllm_app.py`, `vllm_hold.py`). Never used by a real run."""
