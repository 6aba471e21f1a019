"""Synchronous vs one-step-off vs asynchronous GRPO on the same CPU run, side by side.

Each run is `megagym train CONFIG train.mode=M run.seed=S` with its policy server pinned to one core
and the trainer to the other (`taskset` semantics through `os.sched_setaffinity`, inherited by every
child), so that each stands in for its own device. Gym (which trainer rank 0 starts) is moved to the
server's core as its processes appear (`--gym-core`, default the server's): on a cluster Gym runs
on host CPUs, not on the trainer's device, and left on the trainer's core its work during
overlapped modes would slow the trainer. The server is started fresh for every run (a run changes
its weights). Per mode and seed:

    samples/min        trained samples over the training wall time (steps minus validation and
                       checkpoint time)
    trainer idle       share of step time the trainer waited for rollouts (time/generation)
    server idle        share of step time the policy server had no request in flight
    staleness          mean weight versions behind the trainer, per generated token
    val reward         final validation reward (held-out rows)

and the ratio of each mode's samples/min to sync's of the same seed.

    .venv/bin/python bench/async_throughput.py                              # tiny config (16 steps), seeds 1 2
    .venv/bin/python bench/async_throughput.py train.steps=6 optim.total_steps=6 --config configs/smollm2_cpu.yaml --seeds 1
                                          # overrides first: --seeds/--modes take every word after them
    .venv/bin/python bench/async_throughput.py --summarize-only             # tables from finished runs

Writes OUT/summary.md and OUT/summary.json (OUT defaults to runs/async_throughput).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megagym.config import load  # noqa: E402
from megagym.config.schema import RunConfig  # noqa: E402
from megagym.launch.local import materialize_model  # noqa: E402
from megagym.launch.servers import policy_servers  # noqa: E402
from megagym.metrics.writer import read_metrics  # noqa: E402

MODES = ("sync", "one_step_off", "async")


def _gym_pids() -> set[int]:
    """Processes of Gym's venv and everything they started."""
    parent, roots = {}, set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
            parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if b"/.venv-gym/" in cmd:
            roots.add(int(d.name))
    pids, grew = set(roots), True
    while grew:
        more = {p for p, pp in parent.items() if pp in pids and p not in pids}
        pids |= more
        grew = bool(more)
    return pids


def pin_gym(core: int, stop: threading.Event) -> None:
    """Until `stop`: keep every Gym process on `core` (new ones are pinned within half a second)."""
    while not stop.wait(0.5):
        for pid in _gym_pids():
            try:
                threads = [int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()]
            except OSError:  # gone meanwhile
                continue
            for tid in threads:  # affinity is per thread
                try:
                    if os.sched_getaffinity(tid) != {core}:
                        os.sched_setaffinity(tid, {core})
                except OSError:
                    pass


def one_run(config: str, mode: str, seed: int, out: Path, extra: list[str], cores: tuple[int, int],
            gym_core: int) -> None:
    run_dir = out / f"{mode}_seed{seed}"
    overrides = [f"train.mode={mode}", f"run.seed={seed}", f"run.output_dir={run_dir}", "rollout.progress=false",
                 *extra]
    cfg = load(RunConfig, ROOT / config, overrides)
    overrides += materialize_model(cfg)
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    every = set(range(os.cpu_count() or 1))
    os.environ.update(VLLM_CPU_OMP_THREADS_BIND=str(cores[0]))  # the servers' engine threads
    env = dict(os.environ, OMP_NUM_THREADS="1")  # the trainer's
    os.sched_setaffinity(0, {cores[0]})  # the server (and its engine core) inherit core 0
    try:
        with policy_servers(cfg, cfg.model.hf_path, run_dir / "logs", "bench") as urls:
            os.sched_setaffinity(0, {cores[1]})
            argv = [sys.executable, "-m", "megagym.cli", "train", config, *overrides, "--worker",
                    f"servers.urls={json.dumps(urls)}"]
            t0 = time.monotonic()
            print(f"[{time.strftime('%H:%M:%S')}] {mode} seed {seed}: {run_dir}", flush=True)
            stop = threading.Event()
            pinner = threading.Thread(target=pin_gym, args=(gym_core, stop), daemon=True)
            pinner.start()
            try:
                with open(run_dir / "train.log", "w") as f:
                    proc = subprocess.Popen(argv, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
                    try:
                        rc = proc.wait()
                    except BaseException:  # Ctrl-C / SIGTERM: let the trainer stop Gym, then go
                        proc.terminate()
                        proc.wait(120)
                        raise
            finally:
                stop.set()
                pinner.join()
            if rc:
                raise SystemExit(f"{mode} seed {seed} exited {rc}: see {run_dir / 'train.log'}")
            print(f"    done in {(time.monotonic() - t0) / 60:.1f} min", flush=True)
    finally:
        os.sched_setaffinity(0, every)


def summarize(run_dir: Path) -> dict:
    recs = read_metrics(run_dir)
    steps = [r for r in recs if "train/loss" in r or "batch/samples" in r]
    busy = sum(r["time/step"] - r.get("time/validation", 0.0) - r.get("time/checkpoint", 0.0) for r in steps)
    total = sum(r["time/step"] for r in steps)
    trained = sum(r.get("batch/trained_samples", 0) for r in steps)
    vals = [r["val/reward_mean"] for r in recs if "val/reward_mean" in r]
    weighted = lambda key: sum(r.get(key, 0.0) * r["time/step"] for r in steps) / max(total, 1e-9)  # noqa: E731
    stale = [r["batch/staleness_mean"] for r in steps if "batch/staleness_mean" in r]
    return {"steps": len(steps), "samples_per_min": 60 * trained / max(busy, 1e-9),
            "trainer_idle": weighted("time/trainer_idle_share"), "server_idle": weighted("time/server_idle_share"),
            "staleness_mean": sum(stale) / len(stale) if stale else 0.0,
            "val_start": vals[0] if len(vals) > 1 else None, "val_end": vals[-1] if vals else None,
            "minutes": total / 60}


def table(out: Path, seeds: list[int]) -> str:
    lines = ["| mode | seed | samples/min | ratio vs sync | trainer idle | server idle | staleness | val reward start -> end | train min |",
             "|---|---|---|---|---|---|---|---|---|"]
    summary = {}
    for seed in seeds:
        base = None
        for mode in MODES:
            d = out / f"{mode}_seed{seed}"
            if not (d / "metrics.jsonl").exists():
                continue
            s = summarize(d)
            summary[f"{mode}_seed{seed}"] = s
            base = s["samples_per_min"] if mode == "sync" else base
            ratio = f"{s['samples_per_min'] / base:.2f}x" if base else "-"
            v0 = f"{s['val_start']:.3f}" if s["val_start"] is not None else "-"
            lines.append(f"| {mode} | {seed} | {s['samples_per_min']:.1f} | {ratio} | {s['trainer_idle']:.0%} | "
                         f"{s['server_idle']:.0%} | {s['staleness_mean']:.2f} | {v0} -> {s['val_end']:.3f} | "
                         f"{s['minutes']:.1f} |")
    text = "\n".join(lines)
    (out / "summary.md").write_text(text + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides for every run")
    p.add_argument("--config", default="configs/tiny_cpu.yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "async_throughput")
    p.add_argument("--cores", type=int, nargs=2, default=(0, 1), metavar=("SERVER", "TRAINER"))
    p.add_argument("--gym-core", type=int, default=None, help="the core Gym runs on (default: the server's)")
    p.add_argument("--summarize-only", action="store_true")
    a = p.parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM cleans up as Ctrl-C does
    if not a.summarize_only:
        if len(os.sched_getaffinity(0)) < 2:
            raise SystemExit("needs two cores (one for the server, one for the trainer)")
        for seed in a.seeds:
            for mode in a.modes:
                one_run(a.config, mode, seed, a.out, a.overrides, tuple(a.cores),
                        a.cores[0] if a.gym_core is None else a.gym_core)
    print(table(a.out, a.seeds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
