"""The memory plan of `megagym train --dry-run`: what one trainer rank needs, term by term.

Owns: the per-rank estimate for a run configuration's model (its HF config.json), parallel
layout and micro-batch budget — weights, gradients (Megatron's fp32 grad buffer), Adam states
(sharded over data-parallel ranks by the distributed optimizer), activations of one micro-batch
under the chosen recomputation and sequence parallelism, the pipeline's in-flight micro-batches,
the logits under the chosen chunking, the policy servers' share when they sit on the same GPU,
and the runtime's own overhead — and the verdict against the device's memory, naming the largest
term and the knob that shrinks it when a config does not fit.
Must not: import torch or megatron, or start anything (the dry run is a plan, not a probe).

Activations per token and layer are counted from what the layer's autograd graph keeps (Korthikanti
et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", adapted to RMSNorm,
SwiGLU, grouped-query attention and no dropout): the norm inputs and outputs, q/k/v and the
rotated q/k, the attention output, the SwiGLU inputs and output. That is what transformer-engine's
fused layer keeps (flash attention keeps no scores). The local spec (CPU) runs the same layer as
unfused torch ops, which keep more (`LOCAL_SPEC_KEEPS`, measured), and on padded rows its unfused
attention also keeps the heads x row-length softmax probabilities; packed rows it attends sample
by sample with a fused kernel (trainer/segment_attention.py), which keeps none. Full
recomputation keeps each recomputed chunk's input and holds one chunk's activations during its
backward. `bench/train_memory.py` checks the estimate against measured peaks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

GIB = 1 << 30

# What a process holds besides the terms below. GPU: CUDA context, NCCL buffers and the caching
# allocator's slack. CPU: the Python process with torch and megatron-core imported and the
# allocator's slack (measured by bench/train_memory.py on the tiny models).
RUNTIME_BYTES = {"gpu": 3 * GIB, "cpu": 0.5 * GIB}
FRAGMENTATION = {"gpu": 0.10, "cpu": 0.05}  # extra share of the activation + logits terms


@dataclass
class Term:
    name: str
    bytes: float
    knob: str


@dataclass
class MemoryPlan:
    stage: str                      # which pipeline stage is the worst (the one shown)
    terms: list[Term] = field(default_factory=list)
    device_bytes: float | None = None

    @property
    def total(self) -> float:
        return sum(t.bytes for t in self.terms)

    def largest(self) -> Term:
        return max(self.terms, key=lambda t: t.bytes)

    def fits(self) -> bool:
        return self.device_bytes is None or self.total <= self.device_bytes

    def problem(self) -> str | None:
        if self.fits():
            return None
        big = self.largest()
        return (f"memory plan: one trainer rank needs {self.total / GIB:.1f} GiB but the GPU has "
                f"{self.device_bytes / GIB:.1f} GiB; the largest term is {big.name} "
                f"({big.bytes / GIB:.1f} GiB): {big.knob}")

    def table(self) -> str:
        lines = [f"memory plan per trainer rank ({self.stage}):"]
        for t in self.terms:
            lines.append(f"  {t.name:34s}{t.bytes / GIB:9.2f} GiB")
        lines.append(f"  {'total':34s}{self.total / GIB:9.2f} GiB")
        if self.device_bytes is not None:
            margin = self.device_bytes - self.total
            lines.append(f"  {'device memory':34s}{self.device_bytes / GIB:9.2f} GiB  "
                         f"(margin {margin / GIB:.1f} GiB, {100 * margin / self.device_bytes:.0f}%)")
        return "\n".join(lines)


def _params_per_layer(a, tp: int) -> float:
    qkv = a.hidden_size * (a.num_heads + 2 * a.num_kv_heads) * a.head_dim / tp
    proj = a.num_heads * a.head_dim * a.hidden_size / tp
    mlp = 3 * a.hidden_size * a.intermediate_size / tp
    norms = 2 * a.hidden_size + (2 * a.head_dim if a.qk_norm else 0)
    bias = (a.num_heads + 2 * a.num_kv_heads) * a.head_dim / tp if a.qkv_bias else 0
    return qkv + proj + mlp + norms + bias


def stage_params(a, tp: int, pp: int, stage: int, padded_vocab: int) -> float:
    n = a.num_layers // pp * _params_per_layer(a, tp)
    embed = padded_vocab * a.hidden_size / tp
    if stage == 0:
        n += embed
    if stage == pp - 1:
        n += a.hidden_size  # final norm
        if not a.tie_word_embeddings or pp > 1:
            n += embed  # output layer (a tied model keeps a copy on the last stage when pp > 1)
    return n


# What the local spec keeps per token and layer against the fused formula, counted with
# torch.autograd.graph.saved_tensors_hooks (`bench/train_memory.py --part kept`: A24 - A8, so weights
# and head cancel): its unfused torch ops keep more than the formula's tensors (the SwiGLU keeps its
# fc1 output, the activation, the product and a copy: ~5 x ffn, not 3; the norms their
# intermediates; the attention its head-expanded k and v): 1.89x on packed rows, plus ~3.75 bytes
# (one float32 probability) a score on padded rows.
LOCAL_SPEC_KEEPS = 1.9


def layer_activation_bytes(a, tokens: int, row_len: int, tp: int, sp: bool, dtype_bytes: int,
                           attn: str, attention_kept: bool = True) -> float:
    """Bytes one transformer layer keeps for backward for `tokens` tokens in rows of `row_len`.

    `attn`: "flash" (transformer-engine's fused layer), "local" (the local spec on padded rows:
    unfused attention keeps its scores) or "local_packed" (the local spec on packed rows, attended
    per sample by a fused kernel: no scores)."""
    h, d = a.hidden_size, a.head_dim
    seq_split = tp if sp else 1
    replicated = 4 * h / seq_split                  # two norm inputs, two norm outputs
    q, kv = a.num_heads * d / tp, a.num_kv_heads * d / tp
    split = (q + 2 * kv) + (q + kv) + q + 3 * a.intermediate_size / tp  # qkv, rotated q/k, attn out, SwiGLU
    per_token = (replicated + split) * dtype_bytes * (1 if attn == "flash" else LOCAL_SPEC_KEEPS)
    if attn != "local":
        per_token += 2 * a.num_heads / tp * 4       # softmax statistics
    elif attention_kept:  # unfused attention: the softmax probabilities the second matmul needs
        per_token += a.num_heads / tp * row_len * dtype_bytes
    return per_token * tokens


def estimate(arch, cfg, nproc: int = 1, device_bytes: float | None = None, kind: str = "gpu",
             flash: bool | None = None, max_sample_tokens: int | None = None) -> MemoryPlan:
    """The plan for the worst pipeline stage of `cfg` on `nproc` trainer ranks.

    `arch` is a megagym.models HFArch; `kind` "gpu" or "cpu" picks the runtime overhead;
    `flash` whether the layer is transformer-engine's fused one (default: layer_spec "te", or
    "auto" on a GPU, where transformer-engine is expected) rather than the local spec's;
    `max_sample_tokens` the longest sample (default: the servers' max_model_len, else the model's
    context), which is the longest padded row."""
    from megagym.trainer.model import padded_vocab_size

    par, opt = cfg.parallel, cfg.optim
    tp, pp = par.tensor_parallel, par.pipeline_parallel
    dp = max(1, nproc // (tp * pp))
    dtype_bytes = 2 if cfg.model.dtype == "bfloat16" else 4
    if flash is None:
        flash = cfg.model.layer_spec == "te" or (cfg.model.layer_spec == "auto" and kind == "gpu")
    attn = "flash" if flash else "local_packed" if opt.pack_sequences else "local"
    vocab = padded_vocab_size(arch.vocab_size, cfg.model.make_vocab_size_divisible_by, tp)
    tokens = opt.micro_batch_tokens
    longest = max_sample_tokens or int(cfg.servers.settings.get("max_model_len") or arch.max_position_embeddings)
    row_len = tokens if opt.pack_sequences else min(tokens, longest)
    layers = arch.num_layers // pp
    plans = []
    for stage in sorted({0, pp - 1}):
        plan = MemoryPlan(stage=f"pipeline stage {stage} of {pp}, TP {tp}, DP {dp}", device_bytes=device_bytes)
        params = stage_params(arch, tp, pp, stage, vocab)
        shard = dp if opt.distributed_optimizer else 1
        plan.terms += [
            Term("weights", params * dtype_bytes, "raise parallel.tensor_parallel or pipeline_parallel"),
            Term("gradients (fp32 buffer)", params * 4, "raise parallel.tensor_parallel or pipeline_parallel"),
            Term(f"optimizer states (Adam{', /' + str(dp) + ' DP' if shard > 1 else ''})",
                 params * (8 + (4 if dtype_bytes == 2 else 0)) / shard,
                 "set optim.distributed_optimizer: true and use more data-parallel ranks"),
        ]
        one = layer_activation_bytes(arch, tokens, row_len, tp, par.sequence_parallel, dtype_bytes, attn)
        act, knob = _activations(arch, par, layers, tokens, row_len, tp, dtype_bytes, attn, one)
        in_flight = min(pp - stage, pp) if pp > 1 else 1
        plan.terms.append(Term(f"activations ({par.recompute} recompute)", act, knob))
        if in_flight > 1:
            plan.terms.append(Term(f"pipeline: {in_flight - 1} more micro-batches in flight",
                                   (in_flight - 1) * _kept(arch, par, layers, tokens, row_len, tp, dtype_bytes, attn),
                                   "set parallel.recompute: full or lower optim.micro_batch_tokens"))
        if stage == pp - 1:
            chunk = opt.logprob_chunk_tokens or tokens
            chunk = min(chunk, tokens)
            logits = chunk * vocab / tp * (2 * 4 + dtype_bytes)  # fp32 logits + exp, matmul output
            if opt.logprob_chunk_tokens and dtype_bytes == 2:
                logits += vocab / tp * arch.hidden_size * 4  # fp32 accumulator of the weight gradient
            plan.terms.append(Term(f"logits ({'chunks of ' + str(chunk) if opt.logprob_chunk_tokens else 'whole micro-batch'})",
                                   logits, "set optim.logprob_chunk_tokens (e.g. 4096)"))
        frag = FRAGMENTATION[kind] * sum(t.bytes for t in plan.terms[3:])
        plan.terms.append(Term("runtime (context, allocator)", RUNTIME_BYTES[kind] + frag,
                               "nothing to tune: leave this margin"))
        if par.colocated_servers and device_bytes is not None:
            share = float(cfg.servers.settings.get("gpu_memory_utilization", 0.8))
            plan.terms.append(Term(f"policy server on the same GPU ({share:.2f})", share * device_bytes,
                                   "lower servers.settings.gpu_memory_utilization or put servers on other GPUs"))
        plans.append(plan)
    return max(plans, key=lambda p: p.total)


def _kept(arch, par, layers, tokens, row_len, tp, dtype_bytes, attn) -> float:
    """Bytes a micro-batch keeps between its forward and its backward (all layers of the stage)."""
    sp = par.sequence_parallel
    full = layer_activation_bytes(arch, tokens, row_len, tp, sp, dtype_bytes, attn)
    layer_input = tokens * arch.hidden_size / (tp if sp else 1) * dtype_bytes
    if par.recompute == "full":
        n = min(par.recompute_num_layers, layers)
        if par.recompute_method == "uniform":
            return math.ceil(layers / n) * layer_input
        return n * layer_input + (layers - n) * full
    if par.recompute == "selective":
        return layers * layer_activation_bytes(arch, tokens, row_len, tp, sp, dtype_bytes, attn, False)
    return layers * full


def _activations(arch, par, layers, tokens, row_len, tp, dtype_bytes, attn, one_layer) -> tuple[float, str]:
    """Kept activations plus the transient of the layer being computed (recomputed chunk, scores)."""
    kept = _kept(arch, par, layers, tokens, row_len, tp, dtype_bytes, attn)
    scores = arch.num_heads / tp * row_len * tokens * 4 * 2 if attn == "local" else 0.0  # scores + scaled copy
    if par.recompute == "full":
        n = min(par.recompute_num_layers, layers) if par.recompute_method == "uniform" else 1
        return kept + n * one_layer + scores, "lower optim.micro_batch_tokens or raise parallel.tensor_parallel"
    knob = ("set parallel.recompute: full" + ("" if par.sequence_parallel or tp == 1
                                                else " and parallel.sequence_parallel: true")
            + " or lower optim.micro_batch_tokens")
    return kept + scores, knob
