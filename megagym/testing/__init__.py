"""Helpers shared by tests and benchmarks (tiny random checkpoints). Never used by a real run."""
