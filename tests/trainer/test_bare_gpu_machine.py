"""What `bench/gpu_check.sh` needs is what a lent GPU machine has (../shared/DESIGN.md: torch,
transformers, triton and pytest, plus megatron-core carried as a wheel installed without its
dependencies). The trainer path of the check runs here with every other installed package hidden,
so a new import in the trainer cannot cost a GPU session its few minutes.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ON_THE_GPU_MACHINE = ["torch", "transformers", "triton", "pytest"]  # with their own requirements

# Runs in a child: hide every top-level module whose distributions are all outside the allowed set,
# then take the check's trainer path on CPU (fp32): build, a packed train step, the memory plan.
CHILD = r"""
import importlib.machinery as M, importlib.metadata as md, json, sys
allowed = set(json.loads(sys.argv[1]))
owners = md.packages_distributions()
hidden = {m for m, dists in owners.items()
          if not any(d.lower().replace("_", "-") in allowed for d in dists) and m not in ("megatron", "megagym")}

class Hide:
    @staticmethod
    def find_spec(name, path=None, target=None):
        return None if name.split(".")[0] in hidden else M.PathFinder.find_spec(name, path, target)
    @staticmethod
    def find_distributions(*a, **k):
        return M.PathFinder.find_distributions(*a, **k)
    @staticmethod
    def invalidate_caches():
        M.PathFinder.invalidate_caches()

sys.meta_path[:] = [Hide if f is M.PathFinder else f for f in sys.meta_path]
sys.path.insert(0, sys.argv[3] + "/bench")
import gpu_check
from megagym.launch.memory_plan import estimate
from megagym.models import read_arch
from megagym.trainer.policy import Policy

cfg = gpu_check.cfg_for(sys.argv[2], 512, model={"dtype": "float32"}, parallel={"recompute": "full"},
                        optim={"pack_sequences": True, "logprob_chunk_tokens": 256})
loss = Policy.build(cfg).train_step(gpu_check.samples_of([100, 200, 50]))["loss"]
plan = estimate(read_arch(sys.argv[2]), cfg, 1, kind="gpu", max_sample_tokens=200)
left = sorted(m.split(".")[0] for m in sys.modules if m.split(".")[0] in hidden)
print(json.dumps({"loss": loss, "plan_bytes": plan.total, "hidden": len(hidden), "imported_hidden": left}))
"""


def _requirement_closure(roots: list[str]) -> set[str]:
    """Distribution names (normalised) of `roots` and everything they require, extras left out."""
    import importlib.metadata as md

    from packaging.requirements import Requirement

    def norm(name: str) -> str:
        return name.lower().replace("_", "-")

    seen, todo = set(), [norm(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            reqs = md.requires(name) or []
        except md.PackageNotFoundError:
            continue  # not installed here (triton on a CPU machine)
        seen.add(name)
        for text in reqs:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(norm(req.name))
    return seen


def test_gpu_check_needs_only_what_a_bare_gpu_machine_has(tiny_qwen3):
    import json
    import math

    allowed = _requirement_closure(ON_THE_GPU_MACHINE)
    assert {"torch", "transformers"} <= allowed
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(sorted(allowed)), str(tiny_qwen3), str(REPO)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["hidden"] > 20  # the CPU venv's vLLM, FastAPI, pydantic, ... are really hidden
    assert r["imported_hidden"] == []
    assert math.isfinite(r["loss"]) and r["plan_bytes"] > 0
