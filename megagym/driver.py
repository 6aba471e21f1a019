"""The rank-0 side of the GRPO loop: what only one trainer rank does, behind one object.

Owns: on rank 0, the run's Gym stack (restarted when one of its servers dies, at most
`train.gym_restarts` times a run), the batch source (prompts, rollouts, validation), the weight
sender into the policy servers (when a server is lost and one is left, Gym's policy model is moved
onto it), the metrics writer, `config.yaml`, `batches.jsonl` and the plots;
turning a batch into trainable samples (advantages per group, then env-masked and overlong
samples left out) with its staleness (how many weight versions its tokens are behind), and the
idle shares of the trainer and of the policy servers each step. On every other rank a `Driver` is inactive: each method does nothing and
returns None / {} (the weight export is still drained, since its gathers are collective).
Must not: touch the model, the optimizer or torch.distributed (the loop and the Policy do).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from megagym.config import ConfigError, redacted, to_dict
from megagym.config.schema import RunConfig
from megagym.gym.compose import publish_policy_endpoint
from megagym.gym.stack import GymStack
from megagym.metrics import MetricsWriter
from megagym.rollout.batches import Batch, BatchSource, GymDied
from megagym.rollout.stream import staleness
from megagym.trainer.advantages import assign_advantages
from megagym.trainer.checkpoint import latest_checkpoint
from megagym.types import Sample


class Driver:
    def __init__(self, cfg: RunConfig, active: bool):
        self.cfg, self.active = cfg, active
        self.run_dir = Path(cfg.run.output_dir)
        self.ckpt_root = Path(cfg.checkpoint.dir or self.run_dir / "checkpoints")
        self.stack = self.source = self.sender = self.writer = None
        self.gym_restarts = 0
        self.cursor_state: dict | None = None  # the data cursor right after the last batch's prompts

    def __bool__(self) -> bool:
        return self.active

    # ------------------------------------------------------------------ start, resume, stop
    def start(self) -> None:
        """config.yaml, the metrics writer, Gym, the batch source and the weight sender."""
        if not self.active:
            return
        from megagym.weights.sync.sender import make_sender

        cfg = self.cfg
        if not cfg.servers.urls:
            raise ConfigError("servers.urls: the trainer ranks need running policy servers "
                              "(run `megagym train` without --worker to start them on this machine)")
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(redacted(to_dict(cfg)), sort_keys=False))
        self.writer = MetricsWriter(self.run_dir, tensorboard=cfg.train.tensorboard,
                                    wandb_project=cfg.train.wandb_project, run_name=cfg.run.name,
                                    config=redacted(to_dict(cfg)))
        if not cfg.env.run_dir:
            cfg.env.run_dir = str(self.run_dir / "gym")
        self.stack = self._start_gym()
        self.source = BatchSource(cfg, self.stack)
        # async: a sync freezes running generations and they continue on the new weights ("keep");
        # otherwise nothing is running when the weights change ("wait" is a no-op safeguard)
        self.sender = make_sender(cfg.servers.weight_sync, cfg.servers.urls, bucket_bytes=cfg.servers.bucket_mb << 20,
                                  timeout_s=cfg.servers.sync_timeout_s, api_key=cfg.servers.settings.get("api_key"),
                                  pause_mode="keep" if cfg.train.mode == "async" else "wait")
        self._server_idle = self._servers_idle_seconds()
        self.sender.init()

    def latest_checkpoint(self) -> str | None:
        return str(latest_checkpoint(self.ckpt_root) or "") if self.active else None

    def resumed(self, extra: dict, path: str, step: int) -> None:
        """Put the data cursor where the checkpoint left it."""
        if self.active:
            self.source.load_state_dict(extra["data"])
            print(f"megagym train: resumed from {path} at step {step}", flush=True)

    def checkpoint_state(self) -> dict | None:
        """The caller state a checkpoint keeps (rank 0's; the loop broadcasts it)."""
        return {"data": self.source.state_dict(self.cursor_state)} if self.active else None

    def stop(self) -> None:
        if not self.active:
            return
        for part, method in ((self.source, "close"), (self.sender, "close"), (self.stack, "stop"),
                             (self.writer, "close")):
            if part is not None:
                try:
                    getattr(part, method)()
                except Exception as e:  # keep stopping the rest
                    print(f"megagym train: stopping {type(part).__name__}: {e}", file=sys.stderr)

    # ------------------------------------------------------------------ the step's parts
    def next_batch(self, step: int) -> Batch | None:
        """The step's batch (prefetched or collected now); in one_step_off mode the next one starts."""
        if not self.active:
            return None
        batch = self._with_gym("rollouts", self.source.next)
        if self.cfg.train.mode == "one_step_off" and step + 1 < self.cfg.train.steps:
            self.source.prefetch()
        self.cursor_state = batch.cursor_state
        self._record_batch(step + 1, batch)
        return batch

    def trainable(self, batch: Batch | None, metrics: dict) -> list[Sample] | None:
        """Advantages over each whole group, then drop what must not train (env-masked, overlong)."""
        if not self.active:
            return None
        samples = batch.samples
        g = self.cfg.grpo
        assign_advantages(samples, g.normalize_std, g.leave_one_out, g.std_eps)
        keep = [s for s in samples if not s.mask_sample and not (self.cfg.train.overlong_filter and s.truncated)]
        metrics.update(batch.metrics)
        metrics.update(staleness(samples, batch.trainer_version))
        if samples:
            metrics["rollout/reward_mean"] = sum(s.reward for s in samples) / len(samples)
        metrics.update({"batch/samples": len(samples), "batch/trained_samples": len(keep),
                        "batch/masked_or_overlong": len(samples) - len(keep)})
        return keep

    def wait_prefetch(self) -> None:
        """Block until a running prefetch has finished: no trajectory may span two weight versions."""
        if self.active:
            self.source.wait_prefetch()

    def send_weights(self, tensors, version: int) -> dict:
        """Push the exported weights into every policy server (rank 0); other ranks drain the export."""
        if not self.active:
            for _ in tensors:  # the other ranks take part in the gathers
                pass
            return {}
        stats = self.sender.send(tensors, weight_version=version)
        self.source.weight_version = stats.weight_version  # what the servers serve from now on
        if stats.lost_servers and len(self.sender.urls) == 1:  # Gym's sessions go to the one left
            publish_policy_endpoint(self.stack.plan, self._gym_url(self.sender.urls[0]))
            print(f"megagym train: Gym's policy model now uses {self.sender.urls[0]} alone", flush=True)
        return {"sync/seconds": stats.seconds, "sync/gb_per_s": stats.gb_per_s, "sync/buckets": stats.buckets,
                "sync/weight_version": stats.weight_version, "sync/servers": len(self.sender.urls),
                "sync/lost_servers": len(self.sender.lost)}

    def validate(self) -> dict:
        """Validation metrics (val/*, time/validation) once no prefetch is running."""
        if not self.active:
            return {}
        self.source.wait_prefetch()
        return self._with_gym("validation", self.source.validate)

    def skipped(self, step: int) -> None:
        if self.active:
            print(f"megagym train: step {step}: no trainable samples, weights unchanged", flush=True)

    def log(self, step: int, metrics: dict) -> None:
        """Write the step's metrics (with gym restarts and idle time) and print a line."""
        if not self.active:
            return
        metrics["gym/restarts"] = self.gym_restarts
        if "time/step" in metrics:
            busy = sum(metrics.get(f"time/{k}", 0.0)
                       for k in ("generation", "training", "sync", "validation", "checkpoint"))
            metrics["time/idle"] = max(0.0, metrics["time/step"] - busy)
            # the trainer waits while rollouts it needs are still running (all of generation in sync mode)
            metrics["time/trainer_idle_share"] = metrics.get("time/generation", 0.0) / max(metrics["time/step"], 1e-9)
            idle = self._servers_idle_seconds()
            if idle is not None and self._server_idle is not None:
                metrics["time/server_idle_share"] = (idle - self._server_idle) / max(metrics["time/step"], 1e-9)
            self._server_idle = idle
        self.writer.log(step, metrics)
        keys = ("rollout/reward_mean", "val/reward_mean", "train/loss", "train/gen_k3", "time/step")
        shown = "  ".join(f"{k}={metrics[k]:.4g}" for k in keys if isinstance(metrics.get(k), (int, float)))
        print(f"megagym train: step {step}/{self.cfg.train.steps}  {shown}", flush=True)

    def plot(self) -> None:
        """The run's curves in RUN_DIR/plots (what `megagym plot RUN_DIR` draws); never fails the run."""
        if not self.active:
            return
        from megagym.metrics.plot import plot_run

        try:
            print(f"megagym train: curves in {plot_run(self.run_dir)[0].parent}", flush=True)
        except Exception as e:
            print(f"megagym train: plotting failed ({e}); metrics are in {self.run_dir}/metrics.jsonl",
                  file=sys.stderr)

    # ------------------------------------------------------------------ internals
    def _servers_idle_seconds(self) -> float | None:
        """Mean over the live policy servers of the seconds each spent with no request in flight."""
        import requests

        key = self.cfg.servers.settings.get("api_key")
        seen = []
        for url in self.sender.urls:
            try:
                r = requests.get(f"{url}/health", timeout=5,
                                 headers={"Authorization": f"Bearer {key}"} if key else None)
                seen.append(float(r.json()["idle_seconds"]))
            except (requests.RequestException, ValueError, KeyError, TypeError):
                return None
        return sum(seen) / len(seen) if seen else None

    def _start_gym(self) -> GymStack:
        print(f"megagym train: starting Gym ({', '.join(self.cfg.env.environments)})", flush=True)
        live = self.sender.urls if self.sender is not None else self.cfg.servers.urls  # none lost yet
        return GymStack.start(self.cfg.env, policy_base_urls=[self._gym_url(u) for u in live])

    @staticmethod
    def _gym_url(server_url: str) -> str:
        """A policy server's base URL as Gym's model clients use it."""
        return server_url.rstrip("/") + "/v1"

    def _with_gym(self, what: str, fn):
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

    def _record_batch(self, step: int, batch: Batch) -> None:
        """Which prompt rows each step trained on, and the weight versions that generated them
        (`batches.jsonl`): resumes and staleness can be audited."""
        with open(self.run_dir / "batches.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "rows": sorted(g.row_index for g in batch.groups),
                                "rows_in_order": [g.row_index for g in batch.groups],
                                "weight_versions": sorted({s.weight_version for s in batch.samples})}) + "\n")
