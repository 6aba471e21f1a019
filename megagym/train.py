"""`megagym train CONFIG [key=value ...] [--resume] [--dry-run]`: the GRPO loop.

One step, as the code below reads:
    rollouts for the step's prompts (n per prompt, Gym agents calling our policy servers)
    -> samples (+ dynamic sampling, overlong filtering) -> advantages
    -> train (Megatron-Core, loss over all valid tokens of the batch)
    -> weight sync into every policy server (buckets, version bump)
    -> validation every `val.every` steps -> checkpoint every `checkpoint.every_steps`.
In "one_step_off" mode the rollouts of step t+1 run while step t trains; they finish before the
weights change, so every trajectory comes from one weight version, one step stale (truncated
importance sampling against the generation logprobs corrects for it). In "async" mode rollouts
never stop (megagym.rollout.stream): a step takes the oldest finished groups that are at most
`train.max_staleness` weight versions old, and a sync freezes running generations, swaps the
weights and lets them go on (each token keeps the version that made it).

Every trainer rank runs `train()`; rank 0's work (Gym, the rollouts, the weight sender, the
metrics) sits behind `megagym.driver.Driver`, which does nothing on the other ranks, and the
Policy methods broadcast what the others need. Without `--worker`, `main` is the local launcher
(megagym.launch.local) that starts servers and ranks.
Must not: hold model, rollout or transport internals; it only calls them in order.
"""

from __future__ import annotations

import argparse
import sys

from megagym.config import ConfigError, load
from megagym.config.schema import RunConfig
from megagym.metrics.timing import timed
from megagym.rollout.batches import GymDied


def train(cfg: RunConfig, resume: bool = False) -> None:
    import torch.distributed as dist  # the trainer's imports are heavy: only trainer ranks pay for them

    from megagym.driver import Driver
    from megagym.trainer.checkpoint import save_step
    from megagym.trainer.parallel import broadcast_object
    from megagym.trainer.policy import Policy

    policy = Policy.build(cfg)
    driver = Driver(cfg, active=dist.get_rank() == 0)  # rank 0's work; inactive on the other ranks
    try:
        driver.start()
        latest = broadcast_object(driver.latest_checkpoint() if resume else None)
        if latest:
            driver.resumed(policy.load(latest), latest, policy.step)
            driver.send_weights(policy.export_hf(), policy.step)  # the servers started from the HF weights
        elif cfg.val.before_training:
            driver.log(policy.step, driver.validate())
        for step in range(policy.step, cfg.train.steps):
            metrics: dict = {}
            with timed(metrics, "step"):
                with timed(metrics, "generation"):
                    batch = driver.next_batch(step)
                samples = driver.trainable(batch, metrics)
                if broadcast_object(len(samples) if driver else None):  # train_step broadcasts the samples
                    with timed(metrics, "training"):
                        metrics.update({f"train/{k}": v for k, v in policy.train_step(samples).items()})
                    with timed(metrics, "generation"):
                        driver.wait_prefetch()  # no trajectory may span two weight versions
                    with timed(metrics, "sync"):
                        metrics.update(driver.send_weights(policy.export_hf(), policy.step))
                else:  # every rank skips alike: they all received the same count
                    driver.skipped(step)
                done = step + 1
                if done == cfg.train.steps or _every(done, cfg.val.every):
                    metrics.update(driver.validate())  # incl. time/validation
                if cfg.checkpoint.every_steps and (done == cfg.train.steps or _every(done, cfg.checkpoint.every_steps)):
                    with timed(metrics, "checkpoint"):
                        save_step(policy, driver.ckpt_root, broadcast_object(driver.checkpoint_state()),
                                  keep_last=cfg.checkpoint.keep_last)
            driver.log(done, metrics)
        driver.plot()
    finally:
        driver.stop()


def _every(done: int, every: int) -> bool:
    return bool(every) and done % every == 0


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
