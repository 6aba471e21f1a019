"""`megagym train CONFIG [key=value ...] [--resume] [--dry-run]`: the GRPO loop.

One step, as the code below reads:
    rollouts for the step's prompts (n per prompt, Gym agents calling our policy servers)
    -> samples (+ dynamic sampling, overlong filtering) -> advantages
    -> train (Megatron-Core, loss over all valid tokens of the batch)
    -> weight sync into every policy server (buckets, version bump)
    -> validation every `val.every` steps -> checkpoint every `checkpoint.every_steps`.
In "one_step_off" mode the rollouts of step t+1 run while step t trains; they finish before the
weights change, so every trajectory comes from one weight version, one step stale (truncated
importance sampling against the generation logprobs corrects for it).

Every trainer rank runs `train()`; rank 0 also owns Gym, the rollouts, the weight sender, the
metrics and the decisions, and the Policy methods broadcast what the others need. Without
`--worker`, `main` is the local launcher (megagym.launch.local) that starts servers and ranks.
Must not: hold model, rollout or transport internals; it only calls them in order.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from megagym.config import ConfigError, load, redacted, to_dict
from megagym.config.schema import RunConfig
from megagym.rollout.batches import GymDied


def train(cfg: RunConfig, resume: bool = False) -> None:
    import torch.distributed as dist
    import yaml

    from megagym.trainer.advantages import assign_advantages
    from megagym.trainer.checkpoint import latest_checkpoint, save_step
    from megagym.trainer.parallel import broadcast_object
    from megagym.trainer.policy import Policy

    policy = Policy.build(cfg)
    rank0 = dist.get_rank() == 0
    run_dir = Path(cfg.run.output_dir)
    ckpt_root = Path(cfg.checkpoint.dir or run_dir / "checkpoints")
    side = _Rank0Side(cfg, run_dir) if rank0 else None
    try:
        if rank0:
            (run_dir / "config.yaml").write_text(yaml.safe_dump(redacted(to_dict(cfg)), sort_keys=False))
            side.start()
        latest = broadcast_object(str(latest_checkpoint(ckpt_root) or "") if rank0 and resume else None)
        if latest:
            extra = policy.load(latest)
            if rank0:
                side.source.load_state_dict(extra["data"])
                print(f"megagym train: resumed from {latest} at step {policy.step}", flush=True)
            _sync(policy, side)  # the servers start from the HF weights: give them the trained ones
        elif rank0 and cfg.val.before_training:
            side.log(policy.step, side.with_gym("validation", side.source.validate))

        for step in range(policy.step, cfg.train.steps):
            t_step = time.monotonic()
            samples, metrics, cursor_state = None, {}, None
            if rank0:
                t0 = time.monotonic()
                batch = side.with_gym("rollouts", side.source.next)
                if cfg.train.mode == "one_step_off" and step + 1 < cfg.train.steps:
                    side.source.prefetch()
                metrics["time/generation"] = time.monotonic() - t0
                samples, metrics = _prepare(cfg, batch, metrics, assign_advantages)
                cursor_state = batch.cursor_state
                side.record_batch(step + 1, batch)
            if broadcast_object(len(samples) if rank0 else None):  # train_step broadcasts the samples
                t0 = time.monotonic()
                out = policy.train_step(samples)
                metrics.update({f"train/{k}": v for k, v in out.items()})
                metrics["time/training"] = time.monotonic() - t0
                if rank0:
                    t0 = time.monotonic()
                    side.source.wait_prefetch()  # no trajectory may span two weight versions
                    metrics["time/generation"] += time.monotonic() - t0
                t0 = time.monotonic()
                metrics.update(_sync(policy, side))
                metrics["time/sync"] = time.monotonic() - t0
            elif rank0:  # every rank skips alike: they all received the same count
                print(f"megagym train: step {step}: no trainable samples, weights unchanged", flush=True)
            done = step + 1
            if rank0 and (done == cfg.train.steps or (cfg.val.every and done % cfg.val.every == 0)):
                side.source.wait_prefetch()
                metrics.update(side.with_gym("validation", side.source.validate))  # incl. time/validation
            if cfg.checkpoint.every_steps and (done % cfg.checkpoint.every_steps == 0 or done == cfg.train.steps):
                t0 = time.monotonic()
                extra = broadcast_object({"data": {"cursor": cursor_state}} if rank0 else None)
                save_step(policy, ckpt_root, extra, keep_last=cfg.checkpoint.keep_last)
                metrics["time/checkpoint"] = time.monotonic() - t0
            if rank0:
                metrics["gym/restarts"] = side.gym_restarts
                metrics["time/step"] = time.monotonic() - t_step
                busy = sum(metrics.get(f"time/{k}", 0.0)
                           for k in ("generation", "training", "sync", "validation", "checkpoint"))
                metrics["time/idle"] = max(0.0, metrics["time/step"] - busy)
                side.log(done, metrics)
        if rank0:
            _plot(run_dir)
    finally:
        if side is not None:
            side.stop()


def _plot(run_dir: Path) -> None:
    """The run's curves in RUN_DIR/plots (what `megagym plot RUN_DIR` draws); never fails the run."""
    from megagym.metrics.plot import plot_run

    try:
        print(f"megagym train: curves in {plot_run(run_dir)[0].parent}", flush=True)
    except Exception as e:
        print(f"megagym train: plotting failed ({e}); metrics are in {run_dir}/metrics.jsonl", file=sys.stderr)


def _prepare(cfg, batch, metrics: dict, assign_advantages):
    """Advantages over each whole group, then drop what must not train (env-masked, overlong)."""
    samples = batch.samples
    assign_advantages(samples, cfg.grpo.normalize_std, cfg.grpo.leave_one_out, cfg.grpo.std_eps)
    keep = [s for s in samples if not s.mask_sample and not (cfg.train.overlong_filter and s.truncated)]
    metrics.update(batch.metrics)
    if samples:
        metrics["rollout/reward_mean"] = sum(s.reward for s in samples) / len(samples)
    metrics.update({"batch/samples": len(samples), "batch/trained_samples": len(keep),
                    "batch/masked_or_overlong": len(samples) - len(keep)})
    return keep, metrics


def _sync(policy, side) -> dict:
    """Export the trained weights (collective) and push them into every policy server (rank 0)."""
    tensors = policy.export_hf()
    if side is None:
        for _ in tensors:  # other ranks take part in the gathers
            pass
        return {}
    stats = side.sender.send(tensors, weight_version=policy.step)
    return {"sync/seconds": stats.seconds, "sync/gb_per_s": stats.gb_per_s, "sync/buckets": stats.buckets,
            "sync/weight_version": stats.weight_version}


class _Rank0Side:
    """What only rank 0 runs: Gym, the batch source, the weight sender, the metrics file."""

    def __init__(self, cfg: RunConfig, run_dir: Path):
        self.cfg, self.run_dir = cfg, run_dir
        self.stack = self.source = self.sender = self.writer = None
        self.gym_restarts = 0

    def start(self) -> None:
        from megagym.gym.stack import GymStack
        from megagym.metrics import MetricsWriter
        from megagym.rollout.batches import BatchSource
        from megagym.weights.sync.sender import make_sender

        cfg = self.cfg
        urls = cfg.servers.urls
        if not urls:
            raise ConfigError("servers.urls: the trainer ranks need running policy servers "
                              "(run `megagym train` without --worker to start them on this machine)")
        self.writer = MetricsWriter(self.run_dir, tensorboard=cfg.train.tensorboard,
                                    wandb_project=cfg.train.wandb_project, run_name=cfg.run.name,
                                    config=redacted(to_dict(cfg)))
        if not cfg.env.run_dir:
            cfg.env.run_dir = str(self.run_dir / "gym")
        self.stack = self._start_gym()
        self.source = BatchSource(cfg, self.stack)
        self.sender = make_sender(cfg.servers.weight_sync, urls, bucket_bytes=cfg.servers.bucket_mb << 20,
                                  timeout_s=cfg.servers.sync_timeout_s, api_key=cfg.servers.settings.get("api_key"))
        self.sender.init()

    def _start_gym(self):
        from megagym.gym.stack import GymStack

        print(f"megagym train: starting Gym ({', '.join(self.cfg.env.environments)})", flush=True)
        return GymStack.start(self.cfg.env, policy_base_urls=[u.rstrip("/") + "/v1" for u in self.cfg.servers.urls])

    def with_gym(self, what: str, fn):
        """`fn()` (a batch or a validation); when a Gym server has died, restart the whole stack and
        call it again (the batch source rewound its cursor), at most `train.gym_restarts` times a run."""
        while True:
            try:
                return fn()
            except GymDied as e:
                if self.gym_restarts >= self.cfg.train.gym_restarts:
                    raise
                self.gym_restarts += 1
                print(f"megagym train: {e} during {what}; restarting Gym "
                      f"({self.gym_restarts}/{self.cfg.train.gym_restarts}) and redoing it", flush=True)
                self.stack.stop()
                self.stack = self._start_gym()
                self.source.rebind(self.stack)

    def record_batch(self, step: int, batch) -> None:
        """Which prompt rows each step trained on (`batches.jsonl`): resumes can be audited."""
        import json

        with open(self.run_dir / "batches.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "rows": sorted(g.row_index for g in batch.groups)}) + "\n")

    def log(self, step: int, metrics: dict) -> None:
        self.writer.log(step, metrics)
        keys = ("rollout/reward_mean", "val/reward_mean", "train/loss", "train/gen_k3", "time/step")
        shown = "  ".join(f"{k}={metrics[k]:.4g}" for k in keys if isinstance(metrics.get(k), (int, float)))
        print(f"megagym train: step {step}/{self.cfg.train.steps}  {shown}", flush=True)

    def stop(self) -> None:
        for part, method in ((self.source, "close"), (self.sender, "close"), (self.stack, "stop"),
                             (self.writer, "close")):
            if part is not None:
                try:
                    getattr(part, method)()
                except Exception as e:  # keep stopping the rest
                    print(f"megagym train: stopping {type(part).__name__}: {e}", file=sys.stderr)


def parse(argv: list[str]):
    p = argparse.ArgumentParser(prog="megagym train", description="GRPO training on NeMo Gym environments")
    p.add_argument("config", nargs="?", help="run YAML (configs/tiny_cpu.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    p.add_argument("--dry-run", action="store_true", help="resolve and check the config; start nothing")
    p.add_argument("--nproc", type=int, default=1, help="trainer ranks on this machine (local launcher)")
    p.add_argument("--worker", action="store_true", help="run as a trainer rank (launchers pass this)")
    a = p.parse_intermixed_args(argv)  # options may sit between the config and the overrides
    if a.config and "=" in a.config and not a.config.endswith((".yaml", ".yml")):
        a.overrides.insert(0, a.config)
        a.config = None
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(list(sys.argv[1:] if argv is None else argv))
    try:
        cfg = load(RunConfig, a.config, a.overrides)
        if a.dry_run:
            from megagym.launch.dry_run import check

            return check(cfg, nproc=a.nproc)
    except ConfigError as e:
        print(f"megagym train: {e}", file=sys.stderr)
        return 2
    if a.worker:
        from megagym.trainer import quiet_known_warnings

        quiet_known_warnings()
        try:
            train(cfg, resume=a.resume)
        except GymDied as e:
            print(f"megagym train: {e}; Gym was restarted {cfg.train.gym_restarts} time(s) already, "
                  "so the run stops. `megagym train CONFIG --resume` continues from the last checkpoint",
                  file=sys.stderr, flush=True)
            return 3
        return 0
    from megagym.launch.local import run_local

    return run_local(cfg, a.config, a.overrides, a.resume, a.nproc)


if __name__ == "__main__":
    sys.exit(main())
