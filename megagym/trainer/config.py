"""Typed configuration sections of the Megatron-Core trainer: model, parallel, optim, grpo, checkpoint.

Owns: the dataclasses that `megagym/config/schema.py` assembles into `RunConfig`, their defaults
and their validation. Must not: import torch or megatron (config modules are plain dataclasses).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional


@dataclass
class ModelConfig:
    """Which HF checkpoint to train and how to build it on Megatron.

    hf_path      folder with config.json + *.safetensors (+ tokenizer files, copied into checkpoints)
    dtype        parameter / compute dtype; float32 on CPU, bfloat16 on GPU
    layer_spec   "auto": transformer-engine spec when CUDA and TE are present, local spec otherwise
    """

    hf_path: str = ""
    dtype: Literal["float32", "bfloat16"] = "float32"
    layer_spec: Literal["auto", "local", "te"] = "auto"
    make_vocab_size_divisible_by: int = 128

    def validate(self) -> None:
        if self.make_vocab_size_divisible_by < 1:
            raise ValueError("make_vocab_size_divisible_by must be >= 1")


@dataclass
class ParallelConfig:
    """Megatron parallel layout (data parallel size = world size / (tp * pp)) and activation memory.

    sequence_parallel     Megatron's sequence parallelism: norms, residuals and dropout inputs split
                          along the sequence over the TP ranks (needs tensor_parallel > 1)
    recompute             activation recomputation through Megatron's own options: "none"; "full"
                          (keep only each layer's input, recompute the layer in backward); "selective"
                          (recompute the attention core only: the s x s scores of the local spec)
    recompute_method      full only: "uniform" recomputes every layer in chunks of
                          `recompute_num_layers`; "block" recomputes the first `recompute_num_layers`
                          layers of each pipeline stage and keeps the others' activations
    gpu_memory_gib        memory of one GPU for the dry run's memory plan; 0 = the visible GPU's
                          (no fit check when none is visible)
    colocated_servers     the policy servers share the trainer's GPUs (their
                          `servers.settings.gpu_memory_utilization` share is not the trainer's)
    """

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    timeout_minutes: int = 30
    sequence_parallel: bool = False
    recompute: Literal["none", "full", "selective"] = "none"
    recompute_method: Literal["uniform", "block"] = "uniform"
    recompute_num_layers: int = 1
    gpu_memory_gib: float = 0.0
    colocated_servers: bool = False

    def validate(self) -> None:
        if self.tensor_parallel < 1 or self.pipeline_parallel < 1:
            raise ValueError("tensor_parallel and pipeline_parallel must be >= 1")
        if self.sequence_parallel and self.tensor_parallel < 2:
            raise ValueError("sequence_parallel needs tensor_parallel > 1 (it splits activations over TP ranks)")
        if self.recompute_num_layers < 1:
            raise ValueError("recompute_num_layers must be >= 1")
        if self.gpu_memory_gib < 0:
            raise ValueError("gpu_memory_gib must be >= 0 (0 = the visible GPU's memory)")


@dataclass
class OptimConfig:
    """AdamW through Megatron's optimizer (distributed optimizer by default), LR schedule, clipping.

    micro_batch_tokens   token budget of one micro-batch (rows x padded length; with packing the
                         sum of the packed samples' lengths). A sample longer than it is an error.
    pack_sequences       several samples per row (first-fit decreasing into bins of micro_batch_tokens,
                         each sample attending only to itself, per-sample positions) instead of one
                         right-padded sample per row
    logprob_chunk_tokens logits, logprobs and entropy formed this many tokens at a time (the full
                         tokens x vocab logits never exist; the backward recomputes each chunk's logits);
                         0 = the whole micro-batch at once
    """

    lr: float = 5e-6
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 0
    total_steps: int = 1000
    lr_decay: Literal["constant", "linear", "cosine"] = "constant"
    micro_batch_tokens: int = 4096
    distributed_optimizer: bool = True
    pack_sequences: bool = False
    logprob_chunk_tokens: int = 0

    def validate(self) -> None:
        if self.lr <= 0:
            raise ValueError("lr must be > 0")
        if self.micro_batch_tokens < 1:
            raise ValueError("micro_batch_tokens must be >= 1")
        if self.logprob_chunk_tokens < 0:
            raise ValueError("logprob_chunk_tokens must be >= 0 (0 = no chunking)")
        if self.warmup_steps < 0 or self.total_steps < 1:
            raise ValueError("warmup_steps must be >= 0 and total_steps >= 1")
        if self.warmup_steps > self.total_steps:
            raise ValueError("warmup_steps must not exceed total_steps")


@dataclass
class GRPOConfig:
    """GRPO advantages and the token-level clipped policy-gradient loss.

    temperature        sampling temperature; logprobs are log_softmax(logits / temperature)
    clip_low/high      ratio clipped to [1 - clip_low, 1 + clip_high] (DAPO: 0.2 / 0.28)
    tis_threshold      truncated importance sampling: weight min(exp(old - gen), threshold); null = off
    kl_coef            coefficient of the k3 KL to reference logprobs (0 = no KL)
    """

    temperature: float = 1.0
    clip_low: float = 0.2
    clip_high: float = 0.28
    normalize_std: bool = True
    leave_one_out: bool = False
    std_eps: float = 1e-6
    tis_threshold: Optional[float] = 2.0
    kl_coef: float = 0.0

    def validate(self) -> None:
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0")
        if self.clip_low < 0 or self.clip_high < 0:
            raise ValueError("clip_low and clip_high must be >= 0")
        if self.tis_threshold is not None and self.tis_threshold <= 0:
            raise ValueError("tis_threshold must be > 0 or null")
        if self.kl_coef < 0:
            raise ValueError("kl_coef must be >= 0")


@dataclass
class CheckpointConfig:
    """Megatron distributed checkpoints: where, how often, how many to keep."""

    dir: str = ""
    every_steps: int = 0
    keep_last: int = 2
    resume: bool = True

    def validate(self) -> None:
        if self.keep_last < 1:
            raise ValueError("keep_last must be >= 1")
