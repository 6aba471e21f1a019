"""Model families: one folder per family, one registry read by the trainer and the weight code.

A family folder (`megagym/models/<family>/`, torchtitan-style) holds the same three modules:
  arch.py     `HFArch.from_config(config.json dict)` and the `MODEL_TYPES` it reads
  spec.py     `transformer_config(arch, tp, pp, dtype)` and `layer_spec(arch, use_te)` (Megatron-Core)
  weights.py  `param_map(megatron_name, arch, padded_vocab)` / `exported(name, arch)`: HF <-> Megatron
This module owns the registry: which family reads an HF `model_type` (`read_arch`), and the
family package of an arch (`family_of`). Add a family by adding a folder and its name to FAMILIES.
Must not: import megatron or torch itself (a family's spec and weights modules load on first use).
"""

from __future__ import annotations

import json
from importlib import import_module
from pathlib import Path
from types import ModuleType

from megagym.models.llama.arch import HFArch

FAMILIES = ("llama",)


def family(name: str) -> ModuleType:
    """The package `megagym.models.<name>` with its .arch, .spec and .weights modules loaded."""
    if name not in FAMILIES:
        raise ValueError(f"no model family {name!r}; families: {', '.join(FAMILIES)}")
    for part in ("arch", "spec", "weights"):
        import_module(f"megagym.models.{name}.{part}")
    return import_module(f"megagym.models.{name}")


def model_types() -> dict[str, str]:
    """HF `model_type` -> the family that reads it."""
    return {t: name for name in FAMILIES for t in family(name).arch.MODEL_TYPES}


def arch_from_config(cfg: dict) -> HFArch:
    """The architecture of an HF config.json (as a dict), read by its family."""
    model_type = cfg.get("model_type", "")
    types = model_types()
    if model_type not in types:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: {sorted(types)}")
    return family(types[model_type]).arch.HFArch.from_config(cfg)


def read_arch(path: str | Path) -> HFArch:
    """The architecture of the HF model folder `path` (its config.json)."""
    return arch_from_config(json.loads((Path(path) / "config.json").read_text()))


def family_of(arch) -> ModuleType:
    """The family package that builds and maps `arch`."""
    return family(arch.family)


__all__ = ["FAMILIES", "HFArch", "arch_from_config", "family", "family_of", "model_types", "read_arch"]
