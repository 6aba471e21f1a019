"""Load an HF safetensors checkpoint into the local (TP x PP) shard of a Megatron GPTModel.

Owns: naming the local parameters with global layer indices (shared with export), reading only
the HF tensors this rank needs (safetensors, lazily) and copying each rank's shard in place.
Must not: communicate (every rank reads its own slices from the shared files).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

import torch

from megagym.models import family_of

_LOCAL_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def unwrap(model):
    """The GPTModel inside Megatron's DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def global_named_parameters(model) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """(name with global layer index, parameter) for this rank's pipeline stage."""
    gpt = unwrap(model)
    for name, param in gpt.named_parameters():
        m = _LOCAL_LAYER.match(name)
        if m:
            layer = gpt.decoder.layers[int(m.group(1))]
            name = f"decoder.layers.{layer.layer_number - 1}.{m.group(2)}"
        yield name, param


class SafetensorsReader:
    """Reads named tensors from an HF folder (single file or sharded with an index)."""

    def __init__(self, path: str | Path) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"no *.safetensors in {self.path}")
            weight_map = {}
            for f in files:
                with safe_open(f, framework="pt") as h:
                    weight_map.update({k: f.name for k in h.keys()})
        self.weight_map = weight_map
        self._open = safe_open
        self._handles: dict = {}

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise KeyError(f"{name} is not in the HF checkpoint {self.path}")
        fname = self.weight_map[name]
        if fname not in self._handles:
            self._handles[fname] = self._open(self.path / fname, framework="pt")
        return self._handles[fname].get_tensor(name)


def load_hf_into_model(model, hf_path: str | Path, arch, padded_vocab: int) -> None:
    """Copy the HF checkpoint at `hf_path` into this rank's shard of `model`, in place."""
    from megatron.core import parallel_state

    fam = family_of(arch).weights
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    reader = SafetensorsReader(hf_path)
    with torch.no_grad():
        for name, param in global_named_parameters(model):
            pm = fam.param_map(name, arch, padded_vocab)
            shard = pm.to_shard({n: reader.get(n) for n in pm.hf_names}, tp_rank, tp_size)
            if shard.shape != param.shape:
                raise ValueError(f"{name}: HF gives shard {tuple(shard.shape)}, model has {tuple(param.shape)}")
            param.data.copy_(shard.to(param.dtype))
