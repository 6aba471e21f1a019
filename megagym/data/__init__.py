"""Datasets: Gym JSONL rows (`dataset.py`) and preparation from public sources (`prepare.py`)."""
