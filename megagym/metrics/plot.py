"""`megagym plot RUN_DIR`: PNG curves of a run's metrics.

Owns: turning `metrics.jsonl` into pictures — training reward, validation score (overall and per
environment), policy entropy, gen-KL (and |trainer - generation| logprob gap), and the per-step
time breakdown (generation / training / sync / validation / checkpoint / idle, stacked). Must not: read anything but the JSONL, or need a display.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from megagym.metrics.writer import read_metrics

PANELS = {
    "reward.png": ("Training reward", ["rollout/reward_mean"]),
    "validation.png": ("Validation", ["val/reward_mean", "val/pass@1", "val/pass@*"]),  # * : one path part
    "validation_by_env.png": ("Validation per environment", ["val/*/pass@*"]),
    "entropy.png": ("Policy entropy (nats per generated token)", ["train/entropy"]),
    "gen_kl.png": ("Train/generation mismatch", ["train/gen_k3", "train/gen_abs_diff"]),
}
TIME_KEYS = ["time/generation", "time/training", "time/sync", "time/validation", "time/checkpoint", "time/idle"]


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in records:
        if isinstance(r.get(key), (int, float)):
            xs.append(r["step"])
            ys.append(float(r[key]))
    return xs, ys


def _expand(keys: list[str], records: list[dict]) -> list[str]:
    """A `*` in a key stands for one path part without `/` ("val/*/pass@*": every environment's
    pass@k); keys listed by name are not repeated."""
    out = []
    for key in keys:
        if "*" in key:
            pattern = re.compile("^" + "[^/]+".join(re.escape(p) for p in key.split("*")) + "$")
            found = {k for r in records for k in r if pattern.match(k)}
            out += sorted(found - set(keys))
        else:
            out.append(key)
    return out


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    out = Path(out_dir or Path(run_dir) / "plots")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, (title, keys) in PANELS.items():
        fig, ax = plt.subplots(figsize=(6, 3.5))
        drawn = False
        for key in _expand(keys, records):
            xs, ys = _series(records, key)
            if xs:
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, label=key)
                drawn = True
        if not drawn:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.set_xlabel("step")
        if drawn:
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / filename, dpi=100)
        plt.close(fig)
        written.append(out / filename)

    fig, ax = plt.subplots(figsize=(7.5, 3.5))
    steps = [r["step"] for r in records if any(k in r for k in TIME_KEYS)]
    bottom = [0.0] * len(steps)
    for key in TIME_KEYS:
        vals = [float(r.get(key, 0.0)) for r in records if any(k in r for k in TIME_KEYS)]
        if any(vals):
            ax.bar(steps, vals, bottom=bottom, label=key.split("/")[1])
            bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_title("Step time breakdown (s)")
    ax.set_xlabel("step")
    if steps:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(out / "step_time.png", dpi=100)
    plt.close(fig)
    written.append(out / "step_time.png")
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="megagym plot", description="write PNG curves of a run")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="output folder (default RUN_DIR/plots)")
    a = p.parse_args(argv)
    for path in plot_run(a.run_dir, a.out):
        print(path)
    return 0
