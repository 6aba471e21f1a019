"""The real-model learning benchmark: SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32) trained
with GRPO on two of Gym's own environments (arithmetic through math_with_judge, chain_sum/products
through reasoning_gym), on held-out validation sets, on several seeds, plus a transfer set phrased
differently from anything trained on.

For each seed: `megagym train configs/smollm2_cpu.yaml run.seed=S` (its own validation before, every
`val.every` steps and after, per environment: pass@1 over `val.n` samples and pass@n), then `megagym
eval` of the last checkpoint on the transfer sets; the base model's transfer score is measured once.
The baseline is the same run's own step-0 validation (the base model, same rows, same sampling).

Prints, and writes to OUT/summary.md and OUT/summary.json: per seed and environment, pass@1 and
pass@4 before -> after, the minutes of wall-clock (from the launch of `megagym train`, start-up and validation included) at
which pass@1 first stood 30 points above its start, the largest `train/gen_abs_diff` of any step,
the entropy at the first and last step; and the transfer sets before -> after.

    .venv/bin/python bench/smollm2_learning.py                          # seeds 1 and 2, ~70 min on 2 cores
    .venv/bin/python bench/smollm2_learning.py --seeds 3 --steps 20
    .venv/bin/python bench/smollm2_learning.py --summarize-only         # tables from finished runs
Curves: `megagym plot OUT/seed_S` (validation_by_env.png, entropy.png, gen_kl.png, step_time.png).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megagym.metrics.writer import read_metrics  # noqa: E402

CONFIG = "configs/smollm2_cpu.yaml"
TRAIN_ENVS = ("arithmetic", "reasoning_gym")
TRANSFER_ENVS = ("arithmetic_words", "reasoning_gym_transfer")
MEGAGYM = [str(ROOT / ".venv" / "bin" / "megagym")]


def run(argv: list[str], log: Path) -> float:
    """Run one megagym command with its output in `log`; its wall-clock seconds. Fails loudly."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    print(f"[{time.strftime('%H:%M:%S')}] {' '.join(argv)}  (log: {log})", flush=True)
    with open(log, "w") as f:
        rc = subprocess.call(argv, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        raise SystemExit(f"{argv[1]} exited {rc}: see {log}")
    return time.monotonic() - t0


def last_checkpoint(run_dir: Path) -> Path:
    steps = sorted((run_dir / "checkpoints").glob("step_*"))
    if not steps:
        raise SystemExit(f"no checkpoint in {run_dir / 'checkpoints'}")
    return steps[-1]


def transfer_eval(checkpoint: Path, out: Path, limit: int, n: int) -> dict:
    if not out.exists():
        run(MEGAGYM + ["eval", CONFIG, f"env.environments=[{','.join(TRANSFER_ENVS)}]", f"val.limit={limit}",
                       f"val.n={n}", "--checkpoint", str(checkpoint), "--out", str(out)], out.with_suffix(".log"))
    return json.loads(out.read_text())


def seed_summary(run_dir: Path, n: int) -> dict:
    recs = read_metrics(run_dir)
    val = [r for r in recs if any(k.startswith("val/") for k in r)]
    steps = [r for r in recs if "train/gen_abs_diff" in r]
    launched = run_dir / "launched"  # written by main() just before `megagym train` starts
    start = float(launched.read_text()) if launched.exists() else recs[0]["time"]
    out = {"steps": max(r["step"] for r in recs), "minutes": (recs[-1]["time"] - start) / 60,
           "max_gen_abs_diff": max(r["train/gen_abs_diff"] for r in steps) if steps else None,
           "entropy": [steps[0].get("train/entropy"), steps[-1].get("train/entropy")] if steps else None,
           "envs": {}}
    for env in TRAIN_ENVS:
        k1, kn = f"val/{env}/pass@1", f"val/{env}/pass@{n}"
        pts = [r for r in val if k1 in r]
        if not pts:
            continue
        first, last = pts[0], pts[-1]
        reached = next((r for r in pts if r[k1] >= first[k1] + 0.30), None)
        out["envs"][env] = {
            "pass@1": [first[k1], last[k1]], f"pass@{n}": [first.get(kn), last.get(kn)],
            "curve": [[r["step"], r[k1], r.get(kn)] for r in pts],
            "minutes_to_plus_30": None if reached is None else (reached["time"] - start) / 60,
        }
    return out


def table(summary: dict, n: int) -> str:
    lines = [f"| seed | environment | pass@1 before | pass@1 after | change | pass@{n} before | pass@{n} after "
             "| minutes to +30 pts | max gen_abs_diff | entropy first -> last step |", "|" + "---|" * 10]
    for seed, s in summary["seeds"].items():
        ent = s["entropy"] or [None, None]
        for env, e in s["envs"].items():
            (b1, a1), (bn, an) = e["pass@1"], e[f"pass@{n}"]
            mins = "not reached" if e["minutes_to_plus_30"] is None else f"{e['minutes_to_plus_30']:.1f}"
            lines.append(f"| {seed} | {env} | {b1:.3f} | {a1:.3f} | {a1 - b1:+.3f} | {bn:.3f} | {an:.3f} | {mins} "
                         f"| {s['max_gen_abs_diff']:.1e} | {ent[0]:.2f} -> {ent[1]:.2f} |")
    if summary.get("transfer"):
        lines += ["", f"| transfer set | base pass@1 | " + " | ".join(f"seed {s} pass@1" for s in summary["seeds"])
                  + f" | base pass@{n} | " + " | ".join(f"seed {s} pass@{n}" for s in summary["seeds"]) + " |",
                  "|" + "---|" * (2 + 2 * len(summary["seeds"]))]
        base = summary["transfer"]["base"]["environments"]
        for env in TRANSFER_ENVS:
            if env not in base:
                continue
            after = [summary["transfer"][str(s)]["environments"].get(env, {}) for s in summary["seeds"]]
            lines.append(f"| {env} | {base[env]['pass@1']:.3f} | "
                         + " | ".join(f"{a.get('pass@1', float('nan')):.3f}" for a in after)
                         + f" | {base[env].get(f'pass@{n}', float('nan')):.3f} | "
                         + " | ".join(f"{a.get(f'pass@{n}', float('nan')):.3f}" for a in after) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--out", default="runs/smollm2_learning")
    p.add_argument("--steps", type=int, default=None, help="override train.steps / optim.total_steps")
    p.add_argument("--val-n", type=int, default=4, help="samples per validation prompt (the config's val.n)")
    p.add_argument("--transfer-limit", type=int, default=64, help="transfer rows per set")
    p.add_argument("--no-transfer", action="store_true")
    p.add_argument("--summarize-only", action="store_true")
    p.add_argument("overrides", nargs="*", help="further dotted overrides for every training run")
    a = p.parse_args(argv)
    out = (ROOT / a.out).resolve()
    extra = list(a.overrides) + ([f"train.steps={a.steps}", f"optim.total_steps={a.steps}"] if a.steps else [])
    summary: dict = {"seeds": {}, "transfer": {}}
    for seed in a.seeds:
        run_dir = out / f"seed_{seed}"
        if not a.summarize_only and not (run_dir / "done").exists():
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "launched").write_text(f"{time.time():.3f}\n")
            secs = run(MEGAGYM + ["train", CONFIG, f"run.seed={seed}", f"run.output_dir={run_dir}",
                                  f"val.n={a.val_n}"] + extra, out / f"seed_{seed}.log")
            (run_dir / "done").write_text(f"{secs:.0f} s\n")
            subprocess.call(MEGAGYM + ["plot", str(run_dir)], cwd=ROOT, stdout=subprocess.DEVNULL)
        summary["seeds"][str(seed)] = seed_summary(run_dir, a.val_n)
        if not a.no_transfer and not a.summarize_only:
            summary["transfer"][str(seed)] = transfer_eval(last_checkpoint(run_dir), out / f"transfer_seed_{seed}.json",
                                                           a.transfer_limit, a.val_n)
    if not a.no_transfer:
        base = out / "transfer_base.json"
        if not a.summarize_only:
            transfer_eval(ROOT / "models" / "smollm2-135m-instruct", base, a.transfer_limit, a.val_n)
        for seed in a.seeds:
            path = out / f"transfer_seed_{seed}.json"
            if path.exists():
                summary["transfer"][str(seed)] = json.loads(path.read_text())
        if base.exists() and all(str(s) in summary["transfer"] for s in a.seeds):
            summary["transfer"]["base"] = json.loads(base.read_text())
        else:
            summary["transfer"] = {}
    text = table(summary, a.val_n)
    print(text)
    (out / "summary.md").write_text(text + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
