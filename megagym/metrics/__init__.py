"""Run metrics: a JSONL file per run (the source of truth), TensorBoard and optional W&B mirrors, plots."""

from megagym.metrics.writer import MetricsWriter, read_metrics

__all__ = ["MetricsWriter", "read_metrics"]
