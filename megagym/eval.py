"""`megagym eval CONFIG --checkpoint CKPT|HFDIR --out result.json [key=value ...]` and `megagym eval-merge`.

Owns: evaluating one model on a run configuration's validation rows — convert a megagym checkpoint
to an HF folder if needed (in a child process, `megagym convert`), start `servers.count` policy
servers on this machine (or use `servers.urls`), start Gym, run `train.val_n` samples per validation
prompt with the validation sampling settings, and write one JSON result (reward mean, pass@1
averaged over all samples of all prompts — failed rollouts count as unsolved — per environment
too). `eval-merge` tabulates many results (Markdown + CSV) and plots score against step (PNG).
Everything it started is stopped on the way out. Must not: train, or change a checkpoint.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from megagym.config import ConfigError, load


def _is_megagym_checkpoint(path: Path) -> bool:
    return (path / "COMPLETE").exists() and (path / "trainer_state.json").exists()


def resolve_model(checkpoint: Path, work_dir: Path) -> tuple[Path, int | None, bool]:
    """(HF folder, step or None, whether the folder is a temporary conversion)."""
    if _is_megagym_checkpoint(checkpoint):
        step = int(json.loads((checkpoint / "trainer_state.json").read_text())["step"])
        hf = work_dir / f"hf-{checkpoint.name}"
        if hf.exists():
            shutil.rmtree(hf)
        hf.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "megagym.cli", "convert", "--to-hf", str(checkpoint), str(hf)]
        print(f"megagym eval: converting {checkpoint} -> {hf}", flush=True)
        subprocess.run(cmd, check=True, env={**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                                             "MASTER_ADDR": "127.0.0.1"} | _free_master_port())
        return hf, step, True
    if (checkpoint / "config.json").exists():
        name = checkpoint.name
        step = int(name.split("_")[-1]) if name.startswith("step_") and name.split("_")[-1].isdigit() else None
        return checkpoint, step, False
    raise FileNotFoundError(f"{checkpoint} is neither a complete megagym checkpoint (COMPLETE marker) "
                            "nor an HF model folder (config.json)")


def _gpu_env(cfg, i: int) -> dict[str, str]:
    """Server i's own GPUs out of this node's visible ones (vLLM tensor parallel = servers.settings)."""
    from megagym.cluster import gpu_slice

    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if not visible or cfg.servers.count == 1:
        return {}
    tp = int(cfg.servers.settings.get("tensor_parallel_size", 1))
    return {"CUDA_VISIBLE_DEVICES": gpu_slice(visible, i, tp, 0)}


def _free_master_port() -> dict:
    from megagym.server.process import free_port

    return {"MASTER_PORT": str(free_port())}


def score(groups, val_n: int, threshold: float) -> dict:
    """Reward mean over finished samples; pass@1 = solved / (prompts x val_n); pass@val_n = share of
    prompts with at least one solved sample (when val_n > 1); per env and overall."""
    per_env: dict[str, dict] = {}
    for g in groups:
        e = per_env.setdefault(g.env or "unknown", {"prompts": 0, "rewards": [], "solved": 0, "failed": 0, "any": 0})
        e["prompts"] += 1
        e["rewards"] += [s.reward for s in g.samples]
        e["solved"] += sum(s.reward >= threshold for s in g.samples)
        e["any"] += any(s.reward >= threshold for s in g.samples)
        e["failed"] += val_n - len(g.samples)

    def summary(parts: list[dict]) -> dict:
        rewards = [r for p in parts for r in p["rewards"]]
        prompts = sum(p["prompts"] for p in parts)
        return {"prompts": prompts, "samples": len(rewards), "failed_rollouts": sum(p["failed"] for p in parts),
                "reward_mean": sum(rewards) / len(rewards) if rewards else 0.0,
                "pass@1": sum(p["solved"] for p in parts) / (prompts * val_n) if prompts else 0.0,
                **({f"pass@{val_n}": sum(p["any"] for p in parts) / prompts if prompts else 0.0} if val_n > 1 else {})}

    out = summary(list(per_env.values()))
    out["environments"] = {name: summary([e]) for name, e in sorted(per_env.items())}
    return out


def evaluate(cfg, checkpoint: Path, out: Path, work_dir: Path | None = None, keep_hf: bool = False) -> dict:
    from megagym.gym.process import GymStack
    from megagym.launch.local import _server_env, server_overrides
    from megagym.rollout.manager import RolloutManager, load_env_rows
    from megagym.server.process import ServerProcess

    t0 = time.monotonic()
    work_dir = Path(work_dir or out.parent / f".eval-{out.stem}")
    log_dir = work_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    hf, step, temporary = resolve_model(checkpoint, work_dir)
    cfg.model.hf_path = str(hf)
    rows = load_env_rows(cfg.env, "validation", limit=cfg.train.val_limit)
    t = cfg.train
    val = dataclasses.replace(cfg.rollout, n=t.val_n, temperature=t.val_temperature, top_p=t.val_top_p,
                              progress=False)
    servers: list[ServerProcess] = []
    stack = None
    try:
        urls = list(cfg.servers.urls)
        if not urls:
            for i in range(cfg.servers.count):
                sp = ServerProcess(str(hf), overrides=server_overrides(cfg), log_path=log_dir / f"server_{i}.log",
                                   env={**_server_env(cfg), **_gpu_env(cfg, i)})
                print(f"megagym eval: starting policy server {i} (log {sp.log_path})", flush=True)
                servers.append(sp.start(timeout_s=cfg.servers.start_timeout_s))
            urls = [s.base_url for s in servers]
        stack = GymStack.start(cfg.env, policy_base_urls=[u.rstrip("/") + "/v1" for u in urls],
                               run_dir=log_dir / "gym")
        manager = RolloutManager(val, stack, success_threshold=t.val_success_threshold)
        print(f"megagym eval: {len(rows)} prompts x {t.val_n} samples", flush=True)
        groups = manager.collect(rows)
    finally:
        if stack is not None:
            stack.stop()
        for sp in servers:
            sp.stop()
        if temporary and not keep_hf:
            shutil.rmtree(hf, ignore_errors=True)
    result = {"checkpoint": str(checkpoint), "step": step, "run": cfg.run.name,
              "environments_run": list(cfg.env.environments), "val_n": t.val_n,
              "val_temperature": t.val_temperature, "val_top_p": t.val_top_p,
              "success_threshold": t.val_success_threshold, **score(groups, t.val_n, t.val_success_threshold),
              "seconds": round(time.monotonic() - t0, 2)}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out)
    return result


# ------------------------------------------------------------------------------ merge

COLUMNS = ["step", "checkpoint", "prompts", "val_n", "samples", "failed_rollouts", "reward_mean", "pass@1"]


def merge(results: list[Path], out_prefix: Path) -> list[Path]:
    """`<prefix>.md`, `<prefix>.csv` (one row per result, by step) and `<prefix>.png`."""
    recs = [json.loads(Path(r).read_text()) for r in results]
    recs.sort(key=lambda r: (r.get("step") is None, r.get("step") or 0, r.get("checkpoint", "")))
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    csv_path, md_path, png_path = (out_prefix.with_name(out_prefix.name + s) for s in (".csv", ".md", ".png"))
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in recs:
            w.writerow([r.get(c, "") for c in COLUMNS])

    def cell(v) -> str:
        return f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in COLUMNS) + " |" for r in recs]
    md_path.write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["step"] if r.get("step") is not None else i for i, r in enumerate(recs)]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in ("pass@1", "reward_mean"):
        ax.plot(xs, [r.get(key, 0.0) for r in recs], marker="o", label=key)
    ax.set_xlabel("step")
    ax.set_title(f"Validation ({recs[0].get('run', '')}, {recs[0].get('val_n', '?')} samples/prompt)" if recs else "")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return [md_path, csv_path, png_path]


# ------------------------------------------------------------------------------ CLI

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="megagym eval", description="validation of one checkpoint (one JSON result)")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides (e.g. train.val_n=32)")
    p.add_argument("--checkpoint", required=True, help="a megagym checkpoint folder or an HF model folder")
    p.add_argument("--out", required=True, help="result JSON file")
    p.add_argument("--work-dir", help="conversion and logs (default: <out dir>/.eval-<name>)")
    p.add_argument("--keep-hf", action="store_true", help="keep the converted HF folder")
    a = p.parse_intermixed_args(argv)
    from megagym.config.schema import RunConfig

    try:
        cfg = load(RunConfig, a.config, a.overrides)
        result = evaluate(cfg, Path(a.checkpoint), Path(a.out), Path(a.work_dir) if a.work_dir else None, a.keep_hf)
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"megagym eval: {e}", file=sys.stderr)
        return 2
    print(f"megagym eval: {a.checkpoint}: pass@1={result['pass@1']:.4f} reward_mean={result['reward_mean']:.4f} "
          f"({result['prompts']} prompts x {result['val_n']}) -> {a.out}", flush=True)
    return 0


def merge_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="megagym eval-merge", description="tabulate and plot eval results")
    p.add_argument("results", nargs="+", help="result JSON files (or folders holding result_*.json)")
    p.add_argument("--out", required=True, help="output prefix: writes PREFIX.md, PREFIX.csv, PREFIX.png")
    a = p.parse_args(argv)
    files: list[Path] = []
    for r in map(Path, a.results):
        files += sorted(r.glob("result_*.json")) if r.is_dir() else [r]
    if not files:
        print("megagym eval-merge: no result files", file=sys.stderr)
        return 2
    for path in merge(files, Path(a.out)):
        print(path)
    print(Path(a.out).with_name(Path(a.out).name + ".md").read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
