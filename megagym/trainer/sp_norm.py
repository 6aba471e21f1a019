"""Sequence parallelism with the local (non-TE) layer spec: norms whose gradients Megatron reduces.

Owns: `SequenceParallelRMSNorm` and the block spec that puts it wherever megatron-core's local
spec puts `WrappedTorchNorm`. That wrapper (torch's RMSNorm, used when apex is absent, as on the
CPU stack) refuses `sequence_parallel`: under sequence parallelism each TP rank normalises its own
slice of the sequence, so the norm weight's gradient is partial and must be summed over the TP
ranks. Megatron's `finalize_model_grads` does that for parameters marked `sequence_parallel`,
which this class marks. Same parameter names and maths as torch's RMSNorm.
Must not: be used with transformer-engine (TE's norms support sequence parallelism themselves).
"""

from __future__ import annotations

import dataclasses

import torch


class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = bool(config.sequence_parallel)


def local_block_spec(layer_spec, config):
    """The TransformerBlockSubmodules of `layer_spec` with every WrappedTorchNorm replaced (the final
    norm too); `layer_spec` itself when it has none (transformer-engine)."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    def swap(spec):
        if spec is WrappedTorchNorm:
            return SequenceParallelRMSNorm
        subs = getattr(spec, "submodules", None)
        if subs is None or not dataclasses.is_dataclass(subs):
            return spec
        changed = {f.name: swap(getattr(subs, f.name)) for f in dataclasses.fields(subs)}
        return dataclasses.replace(spec, submodules=dataclasses.replace(subs, **changed))

    swapped = swap(layer_spec)
    if swapped == layer_spec:
        return layer_spec
    if config.normalization != "RMSNorm":
        raise ValueError("sequence_parallel with the local layer spec supports RMSNorm models only")
    return TransformerBlockSubmodules(layer_specs=[swapped] * get_num_layers_to_build(config),
                                      layer_norm=SequenceParallelRMSNorm)
