"""The trainer API the GRPO loop calls: a Megatron-Core policy built from an HF checkpoint.

    policy = Policy.build(cfg)                        # cfg: megagym.config.schema.RunConfig
    lps  = policy.compute_logprobs(samples)           # list[Tensor[len(s.token_ids)]] on rank 0
    refs = policy.compute_ref_logprobs(samples)       # the same under the frozen reference model
    m    = policy.train_step(samples, old_logprobs=None, ref_logprobs=None)  # dict[str, float]
    for bucket in policy.export_hf_buckets(bucket_bytes): ...  # list[(hf_name, Tensor)] on rank 0
    policy.save(ckpt_dir, extra_state={...}); extra = policy.load(ckpt_dir)
    policy.step                                        # optimizer steps taken

Distribution: every trainer rank runs the loop script under torchrun; rank 0 drives (talks to
the rollout side) and passes the real `samples` list; the other ranks call the same methods in
the same order with `samples=None`. Each call first broadcasts rank 0's arguments to all ranks
(`broadcast_object_list` over the default group: gloo on CPU). Every method is collective.
Return values that carry data (`compute_logprobs`, the export iterators) are meaningful on rank 0
only; `train_step` metrics are the same on every rank.

Logprob alignment: `compute_logprobs` returns, per sample, a tensor as long as `token_ids` whose
entry t is log p(token_ids[t] | token_ids[:t]) at the GRPO temperature (entry 0 is 0.0), i.e.
aligned with `Sample.gen_logprobs`; `old_logprobs` / `ref_logprobs` passed to `train_step` use
the same layout. `Sample.advantage` must be set (see `advantages.assign_advantages`).

Reference model: with `grpo.kl_coef > 0` the policy also holds a frozen copy of the initial
weights (`model.hf_path`, same TP/PP layout, no gradients, no optimizer state, not checkpointed:
a resumed run rebuilds it from the same folder), and `train_step` computes the reference
logprobs itself when the caller passes none.
Must not: talk to vLLM, Gym or the network; hold rollout logic.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from megagym.trainer import logprobs as lp_mod
from megagym.models import HFArch, read_arch
from megagym.trainer.head import defer_output_layer, output_weight, unwrap
from megagym.trainer.loss import StepSums, grpo_loss_fn
from megagym.trainer.model import activation_kwargs, build_gpt_model, padded_vocab_size, uses_te
from megagym.trainer.packing import pack_bins, rope_at_position_ids
from megagym.trainer.parallel import broadcast_object, init_distributed
from megagym.trainer.step import build_micro_batch, empty_micro_batch, plan_micro_batches, run_schedule, split_over_dp


def _ps():
    from megatron.core import parallel_state

    return parallel_state


class Policy:
    def __init__(self, cfg, arch: HFArch, model, optimizer, scheduler, padded_vocab: int,
                 ref_model=None) -> None:
        self.cfg = cfg
        self.arch = arch
        self.model = model
        self.ref_model = ref_model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.padded_vocab = padded_vocab
        self.step = 0

    # ------------------------------------------------------------------ build
    @classmethod
    def build(cls, cfg) -> "Policy":
        """Init distributed state, build the model, load `cfg.model.hf_path`, wrap DDP + optimizer."""
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads

        from megagym.weights.load import load_hf_into_model

        if not cfg.model.hf_path:
            raise ValueError("model.hf_path is empty: point it at an HF checkpoint folder")
        init_distributed(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel, cfg.parallel.backend,
                         cfg.parallel.timeout_minutes, seed=cfg.run.seed)
        dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
        arch = read_arch(cfg.model.hf_path)
        padded = padded_vocab_size(arch.vocab_size, cfg.model.make_vocab_size_divisible_by,
                                   cfg.parallel.tensor_parallel)
        gpt = build_gpt_model(arch, dtype, cfg.model.layer_spec, cfg.model.make_vocab_size_divisible_by,
                              **activation_kwargs(cfg.parallel))
        load_hf_into_model(gpt, cfg.model.hf_path, arch, padded)
        defer_output_layer(gpt)  # logits are formed in chunks by the logprob function
        layout = packed_layout(cfg)
        if layout == "segments":
            rope_at_position_ids(gpt)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False,
            use_distributed_optimizer=cfg.optim.distributed_optimizer)
        model = DistributedDataParallel(config=gpt.config, ddp_config=ddp_config, module=gpt)
        gpt.config.finalize_model_grads_func = finalize_model_grads
        optimizer, scheduler = build_optimizer(cfg.optim, model, dtype)
        ref_model = None
        if cfg.grpo.kl_coef > 0:
            ref_model = build_gpt_model(arch, dtype, cfg.model.layer_spec, cfg.model.make_vocab_size_divisible_by,
                                        sequence_parallel=cfg.parallel.sequence_parallel)
            load_hf_into_model(ref_model, cfg.model.hf_path, arch, padded)
            defer_output_layer(ref_model)
            if layout == "segments":
                rope_at_position_ids(ref_model)
            ref_model.requires_grad_(False)
            ref_model.eval()
        return cls(cfg, arch, model, optimizer, scheduler, padded, ref_model)

    # ------------------------------------------------------------------ helpers
    def _my_micro_batches(self, token_ids, loss_masks, per_token, per_sample) -> list:
        ps = _ps()
        lengths = [max(len(t) - 1, 1) for t in token_ids]
        shares = split_over_dp(lengths, ps.get_data_parallel_world_size())
        mine = shares[ps.get_data_parallel_rank()]
        optim, par = self.cfg.optim, self.cfg.parallel
        plan = pack_bins if optim.pack_sequences else plan_micro_batches
        groups = plan(mine, lengths, optim.micro_batch_tokens)
        multiple = par.tensor_parallel if par.sequence_parallel else 1
        mbs = [build_micro_batch(g, token_ids, loss_masks, per_token, per_sample, optim.pack_sequences, multiple)
               for g in groups]
        return mbs or [empty_micro_batch(list(per_token) + list(per_sample))]

    def _device(self):
        return next(self.model.parameters()).device

    def _reports(self) -> bool:
        """This rank contributes metric sums (last pipeline stage, TP rank 0)."""
        ps = _ps()
        return ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0

    # ------------------------------------------------------------------ API
    def compute_logprobs(self, samples: Optional[list] = None) -> Optional[list[torch.Tensor]]:
        """No-grad logprobs of every token of every sample (collective); the list on rank 0."""
        return self._logprobs(self.model, broadcast_object(samples))

    def compute_ref_logprobs(self, samples: Optional[list] = None) -> Optional[list[torch.Tensor]]:
        """`compute_logprobs` under the frozen reference model (needs grpo.kl_coef > 0)."""
        if self.ref_model is None:
            raise ValueError("no reference model: it is built only with grpo.kl_coef > 0")
        return self._logprobs(self.ref_model, broadcast_object(samples))

    @torch.no_grad()
    def _logprobs(self, model, samples: list) -> Optional[list[torch.Tensor]]:
        """`samples` already on every rank; the result on rank 0."""
        n = len(samples)
        token_ids = [s.token_ids for s in samples]
        mbs = self._my_micro_batches(token_ids, [[1] * len(t) for t in token_ids], {}, {})
        out: dict[int, torch.Tensor] = {}
        T, V = self.cfg.grpo.temperature, self.arch.vocab_size
        device = self._device()

        weight, chunk = output_weight(unwrap(model)), self.cfg.optim.logprob_chunk_tokens

        def collect(hidden, mb):
            lp = lp_mod.token_logprobs(hidden, weight, mb.targets.to(device), T, V, chunk,
                                       where=mb.mask.to(device) > 0).cpu()  # real tokens only, not padding
            for sid, row, start, _ in mb.spans():
                full = torch.zeros(len(token_ids[sid]))
                full[1:] = lp[row, start: start + len(token_ids[sid]) - 1]
                out[sid] = full
            return lp.new_zeros(()), torch.zeros((), dtype=torch.int)

        was_training = model.training
        model.eval()
        run_schedule(model, mbs, collect, forward_only=True, packed_layout=packed_layout(self.cfg))
        model.train(was_training)
        mine = out if self._reports() else {}
        gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(mine, gathered, dst=0)
        if dist.get_rank() != 0:
            return None
        merged: dict[int, torch.Tensor] = {}
        for part in gathered:
            merged.update(part)
        return [merged[i] for i in range(n)]

    def train_step(self, samples: Optional[list] = None, old_logprobs: Optional[list] = None,
                   ref_logprobs: Optional[list] = None) -> dict[str, float]:
        """One optimizer step of GRPO on `samples` (the global batch); metrics as plain floats."""
        samples, old_logprobs, ref_logprobs = broadcast_object((samples, old_logprobs, ref_logprobs))
        g = self.cfg.grpo
        if g.kl_coef > 0 and ref_logprobs is None:
            ref_logprobs = broadcast_object(self._logprobs(self.ref_model, samples))  # samples are on every rank
        token_ids = [s.token_ids for s in samples]
        per_token = {"gen": [s.gen_logprobs for s in samples]}
        if old_logprobs is not None:
            per_token["old"] = old_logprobs
        if ref_logprobs is not None:
            per_token["ref"] = ref_logprobs
        mbs = self._my_micro_batches(token_ids, [s.loss_mask for s in samples], per_token,
                                     {"adv": [s.advantage for s in samples]})
        device = self._device()
        sums = StepSums()
        weight = output_weight(unwrap(self.model))
        loss_fn = grpo_loss_fn(g, self.arch.vocab_size, device, sums if self._reports() else None,
                               weight, self.cfg.optim.logprob_chunk_tokens)
        self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        run_schedule(self.model, mbs, loss_fn, forward_only=False, packed_layout=packed_layout(self.cfg))
        lr = float(self.optimizer.param_groups[0]["lr"])  # the lr of this update
        ok, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        self.step += 1
        total = sums.as_tensor().to(device)  # NCCL reduces device tensors only
        dist.all_reduce(total)  # only reporting ranks hold non-zero sums
        metrics = StepSums.from_tensor(total).means()
        metrics.update(
            grad_norm=float(grad_norm) if grad_norm is not None else math.nan,
            lr=lr,
            step=float(self.step),
            update_ok=float(bool(ok)),
        )
        return metrics

    def export_hf(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Full HF-named tensors (collective; yields on rank 0 only). See megagym.weights.export."""
        from megagym.weights.export import iter_hf_tensors

        return iter_hf_tensors(self.model, self.arch, self.padded_vocab)

    def export_hf_buckets(self, bucket_bytes: int = 256 << 20) -> Iterator[list[tuple[str, torch.Tensor]]]:
        from megagym.weights.export import iter_hf_buckets

        return iter_hf_buckets(self.model, self.arch, self.padded_vocab, bucket_bytes)

    def save(self, directory: str | Path, extra_state: Optional[dict] = None) -> Path:
        """Atomic distributed checkpoint of model, optimizer, scheduler, RNG, step and `extra_state`."""
        from megagym.trainer.checkpoint import save_checkpoint

        return save_checkpoint(self, Path(directory), extra_state or {})

    def load(self, directory: str | Path) -> dict:
        """Restore everything `save` wrote; returns its `extra_state` (e.g. the data position)."""
        from megagym.trainer.checkpoint import load_checkpoint

        return load_checkpoint(self, Path(directory))


def packed_layout(cfg) -> Optional[str]:
    """How packed rows reach the attention: "thd" with transformer-engine, "segments" with the local spec."""
    if not cfg.optim.pack_sequences:
        return None
    return "thd" if uses_te(cfg.model.layer_spec) else "segments"


def build_optimizer(optim, model, dtype):
    """Megatron's optimizer (Adam with decoupled weight decay, distributed if configured) + LR schedule."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    oc = OptimizerConfig(
        optimizer="adam", lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad, bf16=dtype == torch.bfloat16, params_dtype=dtype,
        use_distributed_optimizer=optim.distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(oc, [model])
    decay_steps = max(optim.total_steps, optim.warmup_steps + 1)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if optim.warmup_steps else optim.lr, max_lr=optim.lr,
        min_lr=min(optim.min_lr, optim.lr) if optim.lr_decay != "constant" else optim.lr,
        lr_warmup_steps=optim.warmup_steps, lr_decay_steps=decay_steps, lr_decay_style=optim.lr_decay,
        start_wd=optim.weight_decay, end_wd=optim.weight_decay, wd_incr_steps=decay_steps,
        wd_incr_style="constant",
    )
    # Megatron's scheduler starts at step 0 (lr 0 under warmup); count the first update as step 1 so
    # update t (1-based) uses lr * min(1, t / warmup_steps).
    scheduler.step(increment=1)
    return optimizer, scheduler
