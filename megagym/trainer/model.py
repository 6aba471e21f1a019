"""Model provider: the local pipeline stage of a Megatron-Core `GPTModel` for an `HFArch`.

Owns: building the `GPTModel` under the current parallel state from the family's
`TransformerConfig` and layer spec (`megagym.models`, one folder per family), the padded
vocabulary size, and marking the tensor-parallel parameters. Must not: know a family's details
(they live in megagym/models/<family>/), load weights (that is `megagym.weights`) or train.
"""

from __future__ import annotations

from typing import Any

import torch

from megagym.models import HFArch, family_of


def padded_vocab_size(vocab: int, divisible_by: int, tp: int) -> int:
    """Vocab rounded up to `divisible_by` (and to a multiple of tp if that does not already divide it).

    Unlike Megatron-LM (divisible_by * tp) the padding does not change with TP for any tp that
    divides `divisible_by`, so a checkpoint saved at TP=2 loads at TP=1 (convert) or TP=4.
    """
    import math

    multiple = divisible_by if divisible_by % tp == 0 else math.lcm(divisible_by, tp)
    return ((vocab + multiple - 1) // multiple) * multiple


def te_available() -> bool:
    """Transformer-engine imports and a GPU is there (its layer spec needs both)."""
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


def uses_te(which_spec: str) -> bool:
    """`model.layer_spec` ("auto" / "te" / "local") resolved on this machine."""
    return te_available() if which_spec == "auto" else which_spec == "te"


def activation_kwargs(parallel) -> dict:
    """TransformerConfig kwargs for `parallel:`'s sequence parallelism and activation recomputation."""
    kw: dict[str, Any] = {"sequence_parallel": parallel.sequence_parallel}
    if parallel.recompute == "full":
        kw.update(recompute_granularity="full", recompute_method=parallel.recompute_method,
                  recompute_num_layers=parallel.recompute_num_layers)
    elif parallel.recompute == "selective":
        kw.update(recompute_granularity="selective", recompute_modules=["core_attn"])
    return kw


def build_gpt_model(arch: HFArch, dtype: torch.dtype = torch.float32, which_spec: str = "auto",
                    divisible_by: int = 128, **config_kwargs: Any):
    """The local pipeline stage of a GPTModel for `arch` under the current parallel state.

    `config_kwargs` go to the TransformerConfig (e.g. `activation_kwargs(cfg.parallel)`)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    family_spec = family_of(arch).spec
    config = family_spec.transformer_config(arch, tp, pp, dtype, **config_kwargs)
    spec = family_spec.layer_spec(arch, uses_te(which_spec))
    if config.sequence_parallel:
        from megagym.trainer.sp_norm import local_block_spec

        spec = local_block_spec(spec, config)  # no-op for TE's norms; see sp_norm.py
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=padded_vocab_size(arch.vocab_size, divisible_by, tp),
        max_sequence_length=arch.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=int(arch.rope_theta),
    )
    mark_tensor_parallel_params(model)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return model.to(device=device, dtype=dtype)


def mark_tensor_parallel_params(model) -> int:
    """Set Megatron's `tensor_model_parallel` attributes on the local spec's parallel layers.

    megatron-core (0.16) sets them only while initialising weights; with
    `perform_initialization=False` + `use_cpu_initialization` (weights come from HF) they are
    missing, and the gradient norm then counts every TP shard as a duplicate: clipping (and the
    reported grad norm) silently use the norm of one TP rank's shard only. Returns how many were set.
    """
    from megatron.core.tensor_parallel import layers

    marked = 0
    for module in model.modules():
        if isinstance(module, (layers.ColumnParallelLinear, layers.VocabParallelEmbedding)):
            dim = 0
        elif isinstance(module, layers.RowParallelLinear):
            dim = 1
        else:
            continue
        for pname in ("weight", "bias"):
            param = getattr(module, pname, None)
            if pname == "bias" and dim == 1:
                continue  # a row-parallel bias is replicated
            if isinstance(param, torch.nn.Parameter) and not getattr(param, "tensor_model_parallel", False):
                layers.set_tensor_model_parallel_attributes(param, True, dim, 1)
                marked += 1
    return marked
