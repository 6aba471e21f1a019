"""CPU compatibility layer for megatron-core's hard-coded CUDA calls. Active only without CUDA.

Owns: every workaround that lets megatron-core (0.16.1 on the CPU stack, 0.19.x on the GPU stack)
train `GPTModel` with the local layer spec on CPU under gloo. Each workaround is a `Patch` in
`PATCHES` with the source pattern that makes it necessary; `tests/trainer/test_cpu_compat.py`
checks, per patch, that the pattern is still in the installed megatron-core (so an upgrade that
removes the need is noticed and the patch can go) and that the patched call works on CPU.
Must not: change anything when CUDA is available, or patch code outside megatron.core.

Mechanism: a patched module gets its module-global `torch` replaced by `_TorchProxy`, which
forwards everything to torch except (a) tensor factories called with a CUDA device, which are
built on CPU, and (b) `torch.cuda`, which becomes a small shim (current_device -> cpu,
synchronize / stream calls -> no-ops, CUDA RNG -> the CPU generator). Only the listed modules see
the proxy; torch itself is untouched.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch

_ACTIVE = False

_FACTORIES = (
    "zeros", "ones", "empty", "full", "tensor", "arange", "randn", "rand", "randint",
    "zeros_like", "ones_like", "empty_like", "full_like", "as_tensor",
)


def _cpu_device(device: Any) -> Any:
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cpu")
    if isinstance(device, torch.device):
        return torch.device("cpu") if device.type == "cuda" else device
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    return device


class _NullStream:
    """Stands in for torch.cuda.Stream / current_stream() on CPU."""

    def wait_stream(self, *_a, **_k) -> None:
        pass

    def wait_event(self, *_a, **_k) -> None:
        pass

    def record_event(self, *_a, **_k) -> None:
        return None

    def synchronize(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return False


class _CudaShim:
    """`torch.cuda` as seen by patched megatron modules on a CPU-only machine."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device() -> torch.device:
        return torch.device("cpu")

    @staticmethod
    def synchronize(*_a, **_k) -> None:
        pass

    @staticmethod
    def current_stream(*_a, **_k) -> _NullStream:
        return _NullStream()

    @staticmethod
    def default_stream(*_a, **_k) -> _NullStream:
        return _NullStream()

    Stream = staticmethod(lambda *a, **k: _NullStream())

    @staticmethod
    def stream(*_a, **_k):
        return contextlib.nullcontext()

    @staticmethod
    def is_available() -> bool:
        return False

    @staticmethod
    def device_count() -> int:
        return 0

    # CUDA RNG -> the CPU generator (dropout under the model-parallel RNG tracker).
    @staticmethod
    def get_rng_state(*_a, **_k) -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state, *_a, **_k) -> None:
        torch.set_rng_state(state)

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    manual_seed_all = manual_seed


class _TorchProxy:
    """Module-global `torch` for patched megatron modules: CUDA devices become CPU."""

    def __init__(self) -> None:
        self.cuda = _CudaShim()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(torch, name)
        if name in _FACTORIES:
            def factory(*args, _f=attr, **kwargs):
                if "device" in kwargs:
                    kwargs["device"] = _cpu_device(kwargs["device"])
                return _f(*args, **kwargs)

            return factory
        return attr


_PROXY = _TorchProxy()


_ORIG_TYPE = torch.Tensor.type
_ORIG_CUDA = torch.Tensor.cuda


def _type_with_cuda_names(self, dtype=None, non_blocking=False, **kwargs):
    """Tensor.type() naming CPU tensors as their CUDA twins ('torch.cuda.FloatTensor')."""
    if dtype is None and not kwargs and not self.is_cuda:
        name = _ORIG_TYPE(self)
        return name.replace("torch.", "torch.cuda.", 1) if name.startswith("torch.") else name
    return _ORIG_TYPE(self, dtype, non_blocking, **kwargs)


def _cuda_noop(self, *args, **kwargs):
    return self


@contextlib.contextmanager
def _cuda_tensor_methods():
    """Inside: `t.type()` reports CUDA type names and `t.cuda()` returns `t` (CPU tensors)."""
    torch.Tensor.type, torch.Tensor.cuda = _type_with_cuda_names, _cuda_noop
    try:
        yield
    finally:
        torch.Tensor.type, torch.Tensor.cuda = _ORIG_TYPE, _ORIG_CUDA


def _wrapped(fn: Callable) -> Callable:
    import functools

    @functools.wraps(fn)
    def inner(*args, **kwargs):
        with _cuda_tensor_methods():
            return fn(*args, **kwargs)

    inner._megagym_wrapped = True
    return inner


@dataclass
class Patch:
    """One workaround. `pattern` is the source text in `module` that makes it necessary.

    kind "proxy": the module's global `torch` becomes `_TorchProxy`;
    kind "methods": the callables named in `targets` (qualnames in `module`) run with
    `_cuda_tensor_methods()` (CUDA type names, `.cuda()` a no-op).
    """

    name: str
    module: str
    pattern: str
    why: str
    kind: str = "proxy"
    targets: tuple[str, ...] = ()

    def source_has_pattern(self) -> bool:
        mod = importlib.import_module(self.module)
        return self.pattern in inspect.getsource(mod)

    def apply(self, mod: Any) -> None:
        if self.kind == "proxy":
            mod.torch = _PROXY
            if self.name == "rng-tracker":
                mod._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
                mod._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
            return
        for qualname in self.targets:
            owner_name, _, attr = qualname.rpartition(".")
            owner = getattr(mod, owner_name) if owner_name else mod
            fn = owner.__dict__[attr] if owner_name else getattr(mod, attr)
            kind = type(fn) if isinstance(fn, (staticmethod, classmethod)) else None
            inner = fn.__func__ if kind else fn
            if getattr(inner, "_megagym_wrapped", False):
                continue
            setattr(owner, attr, kind(_wrapped(inner)) if kind else _wrapped(inner))


PATCHES: list[Patch] = [
    Patch("rng-tracker", "megatron.core.tensor_parallel.random", "torch.cuda.get_rng_state",
          "the model-parallel RNG tracker (dropout, init) reads and seeds the CUDA generator"),
    Patch("rotary", "megatron.core.models.common.embeddings.rotary_pos_embedding",
          "torch.cuda.current_device()", "RoPE moves inv_freq to torch.cuda.current_device()"),
    Patch("memory-buffer", "megatron.core.utils", "device=torch.cuda.current_device()",
          "GlobalMemoryBuffer (attention scores) allocates on torch.cuda.current_device()"),
    Patch("causal-mask", "megatron.core.transformer.utils", 'device="cuda"',
          "the default causal attention mask is built with device=\"cuda\""),
    Patch("schedules", "megatron.core.pipeline_parallel.schedules", 'device="cuda"',
          "forward_backward_* count tokens in a device=\"cuda\" tensor"),
    Patch("p2p", "megatron.core.pipeline_parallel.p2p_communication", "torch.cuda.current_device()",
          "pipeline send/recv allocates on torch.cuda.current_device() (and synchronizes CUDA)"),
    Patch("grad-buffer", "megatron.core.distributed.param_and_grad_buffer", "device=torch.cuda.current_device()",
          "DDP's contiguous param/grad buffers are allocated on torch.cuda.current_device()"),
    Patch("ddp-stream", "megatron.core.distributed.distributed_data_parallel", "torch.cuda",
          "DDP creates / waits on CUDA streams (0.19: torch.cuda.current_stream on every step)"),
    Patch("optimizer-alloc", "megatron.core.optimizer.optimizer", "device='cuda'",
          "the mixed-precision optimizer allocates found_inf with device='cuda'"),
    Patch("distopt-alloc", "megatron.core.optimizer.distrib_optimizer", "torch.cuda.current_device()",
          "the distributed optimizer allocates gather buffers on torch.cuda.current_device()"),
    Patch("distopt-types", "megatron.core.optimizer.distrib_optimizer", "'torch.cuda.FloatTensor'",
          "the distributed optimizer accepts only params whose .type() is torch.cuda.*Tensor",
          kind="methods", targets=("DistributedOptimizer._build_model_and_main_param_groups",
                                   "DistributedOptimizer.__init__")),
    Patch("optimizer-types", "megatron.core.optimizer.optimizer", "'torch.cuda.FloatTensor'",
          "the mixed-precision optimizer accepts only params whose .type() is torch.cuda.*Tensor",
          kind="methods", targets=("Float16OptimizerWithFloat16Params.__init__",)),
    Patch("clip-grads", "megatron.core.optimizer.clip_grads", "'torch.cuda.FloatTensor'",
          "gradient clipping asserts grad.type() == 'torch.cuda.FloatTensor'",
          kind="methods", targets=("clip_grad_by_total_norm_fp32",)),
    Patch("clip-grads-import", "megatron.core.optimizer.optimizer", "clip_grad_by_total_norm_fp32(",
          "optimizer.py calls its own imported reference of clip_grad_by_total_norm_fp32 (same assert)",
          kind="methods", targets=("clip_grad_by_total_norm_fp32",)),
    Patch("clip-grads-alloc", "megatron.core.optimizer.clip_grads", "device='cuda'",
          "gradient norms are reduced in device='cuda' tensors"),
    Patch("ckpt-preload", "megatron.core.dist_checkpointing.strategies.filesystem_async",
          "torch.cuda.synchronize()", "checkpoint writes call torch.cuda.synchronize() before copying tensors"),
    Patch("ckpt-saver", "megatron.core.dist_checkpointing.strategies.state_dict_saver", "device='cuda'",
          "the checkpoint saver all-reduces its status flags in device='cuda' tensors"),
    Patch("ckpt-async", "megatron.core.dist_checkpointing.strategies.async_utils",
          "torch.cuda.synchronize()", "the (a)sync save request calls torch.cuda.synchronize()"),
    Patch("ckpt-exchange", "megatron.core.dist_checkpointing.exchange_utils", 'device="cuda"',
          "fully parallel save/load exchanges shards through device=\"cuda\" buffers"),
    Patch("sp-mappings", "megatron.core.tensor_parallel.mappings", "device=torch.cuda.current_device()",
          "sequence parallelism's all-gather / reduce-scatter allocate on torch.cuda.current_device()"),
    Patch("sp-linear", "megatron.core.tensor_parallel.layers", "device=torch.cuda.current_device()",
          "under sequence parallelism the linear layers' backward all-gathers into torch.cuda.current_device()"),
    Patch("tied-embedding", "megatron.core.models.common.language_module.language_module",
          "weight.data.cuda()", "with PP and tied embeddings the output copy is moved with .cuda()",
          kind="methods", targets=("LanguageModule.setup_embeddings_and_output_layer",)),
]

def active() -> bool:
    return _ACTIVE


def activate() -> list[str]:
    """Apply every patch whose module still has its pattern; no-op with CUDA. Returns names applied."""
    global _ACTIVE
    if torch.cuda.is_available():
        return []
    applied = []
    for patch in PATCHES:
        mod = importlib.import_module(patch.module)
        done = getattr(mod, "_megagym_cpu_compat", set())
        if patch.name not in done:
            patch.apply(mod)
            mod._megagym_cpu_compat = done | {patch.name}
        applied.append(patch.name)
    _ACTIVE = True
    return applied
