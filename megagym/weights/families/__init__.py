"""HF <-> Megatron name and layout maps, one module per architecture family.

A family module exposes `param_map(meg_name, arch) -> ParamMap | None` for a Megatron parameter
name with a *global* layer index. Add a family by adding a module and a line to `FAMILIES`.
"""

from __future__ import annotations

from importlib import import_module

# HFArch.family -> module implementing the map
FAMILIES = {"qwen3": "llama", "qwen2": "llama", "llama": "llama"}


def family_module(family: str):
    if family not in FAMILIES:
        raise ValueError(f"no HF<->Megatron weight map for family {family!r}")
    return import_module(f"megagym.weights.families.{FAMILIES[family]}")
