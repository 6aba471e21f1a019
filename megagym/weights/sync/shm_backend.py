"""vLLM-side pieces of megagym's weight sync: the `megagym_shm` transfer engine and a worker mixin.

This module is what `worker_extension_cls` names (see `engine_side.engine_kwargs`), so every
vLLM worker imports it before it loads the model; importing it registers
`SharedMemoryWeightTransferEngine` under the backend name `"megagym_shm"` with
`WeightTransferEngineFactory`. vLLM ships no CPU backend; this one moves buckets through a
/dev/shm file written by the trainer (`sender.ShmWeightSender`) and described by a manifest:

- `start_weight_update`  -> vLLM's layerwise reload lifecycle (`initialize_layerwise_reload`),
  because plain `load_weights` after start-up fails on CPU (weights are repacked);
- `update_weights(info)` -> validate the bucket's names/shapes against the served checkpoint,
  map the segment, `model.load_weights(views)`; views still buffered by a half-loaded layer are
  cloned, since the trainer reuses the segment for the next bucket (megagym's senders never split
  a decoder layer across buckets: see `buckets.iter_buckets`; this protects other clients);
- `finish_weight_update` -> `finalize_layerwise_reload`, then re-pack a tied `lm_head` on CPU
  (vLLM keeps a stale prepacked copy of the tied embedding otherwise: logprob errors of ~1).

`MegagymWorkerExtension` adds worker RPCs used by `engine_side`: `megagym_refresh_lm_head`
(the tied-lm_head refresh for backends that are not ours, e.g. vLLM's `nccl`/`ipc`) and
`megagym_abort_weight_update` (put back the old weights of every layer not fully loaded, leave
the update session, so the engine keeps serving after a failed or abandoned update).

Must not: import megatron or anything of megagym outside `weights.sync` (it runs inside vLLM's
worker processes), or receive tensors as RPC arguments (they arrive broken: paths only).
"""

from __future__ import annotations

import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

from megagym.weights.sync.buckets import Manifest, ShmSegment, dtype_from_name, unpack

log = logging.getLogger(__name__)

BACKEND_NAME = "megagym_shm"


@dataclass
class ShmInitInfo(WeightTransferInitInfo):
    """Worker-side init info. `validate`: check names/shapes against the served checkpoint.

    `refresh_tied_lm_head` exists so a test can show what a missing refresh does; keep it True.
    """

    validate: bool = True
    refresh_tied_lm_head: bool = True


@dataclass
class ShmUpdateInfo(WeightTransferUpdateInfo):
    """One bucket: a /dev/shm segment (`shm_path`, `shm_size`) and the manifest of its bytes."""

    shm_path: str
    shm_size: int
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]
    offsets: list[int]

    def __post_init__(self):
        n = len(self.names)
        if not (len(self.dtype_names) == len(self.shapes) == len(self.offsets) == n):
            raise ValueError(
                "`names`, `dtype_names`, `shapes` and `offsets` must have the same length, got "
                f"{n}, {len(self.dtype_names)}, {len(self.shapes)}, {len(self.offsets)}"
            )


def checkpoint_param_shapes(model_dir: str) -> dict[str, list[int]] | None:
    """HF tensor name -> shape read from the safetensors headers in `model_dir` (no data read).

    None when the checkpoint is not a local safetensors folder (then nothing is validated).
    """
    files = sorted(Path(model_dir).glob("*.safetensors")) if os.path.isdir(model_dir) else []
    if not files:
        return None
    shapes: dict[str, list[int]] = {}
    for f in files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name != "__metadata__":
                shapes[name] = list(meta["shape"])
    return shapes


def tied_embeddings(model: torch.nn.Module) -> bool:
    lm_head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if lm_head is None or embed is None:
        return False
    w1, w2 = getattr(lm_head, "weight", None), getattr(embed, "weight", None)
    return w1 is not None and w1 is w2


def refresh_tied_lm_head(model: torch.nn.Module) -> bool:
    """Re-run the lm_head's post-load processing when it shares the embedding weight.

    On CPU that rebuilds the prepacked GEMM weight from the freshly loaded embedding; elsewhere
    it is the same cheap processing vLLM runs after loading. Returns whether it ran.
    """
    if not tied_embeddings(model):
        return False
    lm_head = model.lm_head
    method = getattr(lm_head, "quant_method", None)
    if method is None:
        return False
    method.process_weights_after_loading(lm_head)
    return True


def abort_layerwise_reload(model: torch.nn.Module, model_config: Any) -> int:
    """Leave vLLM's layerwise reload without processing half-loaded layers.

    Every layer still waiting for weights gets its pre-update tensors back (vLLM's own fallback
    for layers that loaded nothing); fully loaded layers keep their new weights. Returns how many
    layers were rolled back.
    """
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload
    from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO

    rolled_back = 0
    for layer in model.modules():
        info = LAYERWISE_INFO.get(layer)
        if info is not None and info.can_load() and info.kernel_tensors is not None:
            rolled_back += info.load_numel > 0
            info.load_numel = 0
            info.loaded_weights = []
    finalize_layerwise_reload(model, model_config)
    return rolled_back


class SharedMemoryWeightTransferEngine(WeightTransferEngine[ShmInitInfo, ShmUpdateInfo]):
    """Receives buckets from /dev/shm (one host, CPU or GPU) and loads them layer by layer."""

    init_info_cls = ShmInitInfo
    update_info_cls = ShmUpdateInfo

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self.validate = True
        self.refresh_lm_head = True
        self._expected: dict[str, list[int]] | None = None
        self._segments: dict[str, ShmSegment] = {}
        self._initialized = False

    # -- lifecycle -------------------------------------------------------------------------
    def init_transfer_engine(self, init_info: ShmInitInfo) -> None:
        self.validate = init_info.validate
        self.refresh_lm_head = init_info.refresh_tied_lm_head
        self._expected = checkpoint_param_shapes(self.model_config.model) if self.validate else None
        if self.validate and self._expected is None:
            log.warning("megagym_shm: no local safetensors under %s; bucket names/shapes are not "
                        "validated", self.model_config.model)
        self._initialized = True

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        if not self._initialized:
            raise RuntimeError("megagym_shm: init_weight_transfer_engine must come before an update")
        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)
        if self.refresh_lm_head:
            refresh_tied_lm_head(self.model)
        self._close_segments()

    def abort_weight_update(self) -> int:
        try:
            return abort_layerwise_reload(self.model, self.model_config)
        finally:
            self._close_segments()

    def shutdown(self) -> None:
        self._close_segments()

    # -- data ------------------------------------------------------------------------------
    def _check(self, info: ShmUpdateInfo) -> None:
        for name, dtype_name, shape in zip(info.names, info.dtype_names, info.shapes):
            dtype = dtype_from_name(dtype_name)
            if not dtype.is_floating_point:
                raise ValueError(f"weight {name!r}: dtype {dtype_name} is not a floating-point type")
            if self._expected is None:
                continue
            expected = self._expected.get(name)
            if expected is None and name == "lm_head.weight":
                expected = self._expected.get("model.embed_tokens.weight")  # tied checkpoints omit it
            if expected is None:
                raise ValueError(
                    f"weight {name!r} is not a parameter of the served model "
                    f"({self.model_config.model}); nothing of this bucket was loaded"
                )
            if list(shape) != list(expected):
                raise ValueError(
                    f"weight {name!r} has shape {list(shape)}, the served model expects "
                    f"{list(expected)}; nothing of this bucket was loaded"
                )

    def _segment(self, path: str, size: int) -> ShmSegment:
        seg = self._segments.get(path)
        if seg is None or seg.size < size:
            if seg is not None:
                seg.close()
            seg = self._segments[path] = ShmSegment.attach(path, size)
        return seg

    def receive_weights(self, info: ShmUpdateInfo) -> None:
        try:
            self._check(info)
            seg = self._segment(info.shm_path, info.shm_size)
            manifest = Manifest(info.names, info.dtype_names, info.shapes, info.offsets)
            weights = unpack(seg.tensor, manifest)
        except Exception:
            # The worker leaves the update session when a bucket fails; roll back here so no
            # layer stays on the meta device and the engine keeps serving the previous weights.
            self.abort_weight_update()
            raise
        device_weights = weights
        if self.device.type != "cpu":
            device_weights = [(n, t.to(self.device, non_blocking=True)) for n, t in weights]
        from vllm.model_executor.model_loader.mtp_validation import disable_mtp_completeness_check

        with disable_mtp_completeness_check():
            try:
                self.model.load_weights(device_weights)
            except Exception as exc:
                raise RuntimeError(
                    f"loading a bucket of {len(info.names)} tensors ({info.names[0]} .. {info.names[-1]}) "
                    f"failed: {type(exc).__name__}: {exc}"
                ) from exc
        if self.device.type == "cpu":
            self._detach_buffered_views(seg)

    def _detach_buffered_views(self, seg: ShmSegment) -> None:
        """Clone the shm views that half-loaded layers still hold (the segment gets reused)."""
        from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO

        lo = seg.tensor.data_ptr()
        hi = lo + seg.size
        for layer in self.model.modules():
            info = LAYERWISE_INFO.get(layer)
            if info is None or not info.loaded_weights:
                continue
            for _, bound in info.loaded_weights:
                for key, value in bound.arguments.items():
                    if isinstance(value, torch.Tensor) and lo <= value.data_ptr() < hi:
                        bound.arguments[key] = value.clone()

    def _close_segments(self) -> None:
        for seg in self._segments.values():
            seg.close()
        self._segments.clear()


class MegagymWorkerExtension:
    """Mixed into vLLM's Worker class (`worker_extension_cls`); methods are reachable through
    `collective_rpc`. Names carry a `megagym_` prefix so they cannot shadow Worker methods."""

    def megagym_refresh_lm_head(self) -> bool:
        """Re-pack a tied lm_head after an update by a backend that does not do it itself."""
        engine = getattr(self, "weight_transfer_engine", None)
        if isinstance(engine, SharedMemoryWeightTransferEngine):
            return False  # done in its finish_weight_update
        return refresh_tied_lm_head(self.model_runner.get_model())

    def megagym_abort_weight_update(self) -> int:
        """Abandon the current update (if any): roll back half-loaded layers, leave the session."""
        engine = getattr(self, "weight_transfer_engine", None)
        if engine is None:
            return 0
        if isinstance(engine, SharedMemoryWeightTransferEngine):
            rolled = engine.abort_weight_update()
        else:
            rolled = abort_layerwise_reload(engine.model, engine.model_config)
        engine.reset_weight_update_target()
        self._weight_update_active = False
        return rolled

    def megagym_weight_update_active(self) -> bool:
        return bool(getattr(self, "_weight_update_active", False))


def _register() -> None:
    try:
        WeightTransferEngineFactory.register_engine(BACKEND_NAME, SharedMemoryWeightTransferEngine)
    except ValueError:
        pass  # already registered (module imported twice, e.g. under another name)


_register()
