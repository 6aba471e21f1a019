"""`megagym data prepare dapo17k|aime24|workplace_assistant|arithmetic|reasoning_gym`: Gym JSONL rows.

The three benchmark datasets come from public HF datasets (below); `arithmetic` and
`reasoning_gym` are generated offline from seeds by their own modules (megagym/data/).

Owns: the three benchmark datasets' sources and row mappings, matching the rows Gym's own prepare
scripts write (resources_servers/math_with_judge/prepare_{dapo17k,aime24}.py and
resources_servers/workplace_assistant/dataset_preprocess.py in Gym 0.7.0):

    dapo17k              YouJiacheng/DAPO-Math-17k-dedup (train) -> data/dapo17k/train.jsonl
                         input = prompt (chat messages), expected_answer = reward_model.ground_truth
    aime24               HuggingFaceH4/aime_2024 (train)        -> data/aime24/validation.jsonl
                         a system prompt asking for \\boxed{}, the problem, expected_answer = answer
    workplace_assistant  nvidia/Nemotron-RL-agent-workplace_assistant (train, validation)
                         -> data/workplace_assistant/{train,validation}.jsonl (rows as shipped:
                         responses_create_params with its tools, ground_truth, category, environment_name)

One code path reads the dataset's files from a folder: a snapshot downloaded from the hub
(`huggingface_hub.snapshot_download`, parquet/JSONL files only) or, with `--source DIR`, a local
folder with the same files (tests, air-gapped clusters). Parquet needs `pyarrow`.
Outputs are written to `<file>.tmp` and renamed, so an interrupted run leaves no half file.
Must not: talk to Gym or stamp sampling parameters (the rollout manager does that).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

AIME_SYSTEM_PROMPT = ("Your task is to solve a math problem.  Make sure to put the answer (and only the answer) "
                      "inside \\boxed{}.")


def _messages(value) -> list[dict]:
    """Chat messages as plain {role, content} dicts (parquet may add null fields or store JSON text)."""
    if isinstance(value, str):
        value = json.loads(value)
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _maybe_json(value):
    return json.loads(value) if isinstance(value, str) and value[:1] in ("{", "[") else value


def dapo17k_row(ex: dict, i: int) -> dict:
    prompt = _messages(ex["prompt"])
    gt = _maybe_json(ex["reward_model"])["ground_truth"]
    return {"responses_create_params": {"input": prompt}, "question": prompt[0]["content"],
            "expected_answer": str(gt)}


def aime24_row(ex: dict, i: int) -> dict:
    return {"responses_create_params": {"input": [{"role": "system", "content": AIME_SYSTEM_PROMPT},
                                                  {"role": "user", "content": ex["problem"]}]},
            "question": ex["problem"], "expected_answer": str(ex["answer"])}


def workplace_row(ex: dict, i: int) -> dict:
    params = _maybe_json(ex["responses_create_params"])
    if not isinstance(params, dict) or "input" not in params:
        raise ValueError(f"row {i}: responses_create_params has no input")
    return {"id": i, "responses_create_params": params, "ground_truth": _maybe_json(ex["ground_truth"]),
            "category": ex.get("category"), "environment_name": ex.get("environment_name")}


@dataclass(frozen=True)
class Recipe:
    repo_id: str
    splits: dict[str, str]  # source split -> output file (relative to the output root)
    row: Callable[[dict, int], dict]


RECIPES: dict[str, Recipe] = {
    "dapo17k": Recipe("YouJiacheng/DAPO-Math-17k-dedup", {"train": "dapo17k/train.jsonl"}, dapo17k_row),
    "aime24": Recipe("HuggingFaceH4/aime_2024", {"train": "aime24/validation.jsonl"}, aime24_row),
    "workplace_assistant": Recipe("nvidia/Nemotron-RL-agent-workplace_assistant",
                                  {"train": "workplace_assistant/train.jsonl",
                                   "validation": "workplace_assistant/validation.jsonl"}, workplace_row),
}
DATA_SUFFIXES = (".parquet", ".jsonl", ".json")
# datasets generated offline from seeds (no hub): name -> module with prepare(out_root) -> {file: rows}
GENERATORS = {"arithmetic": "megagym.data.arithmetic", "reasoning_gym": "megagym.data.reasoning_gym"}


def download(repo_id: str, cache_dir: str | None = None) -> Path:
    """A local snapshot of the dataset repo's data files (needs hub access)."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, repo_type="dataset", cache_dir=cache_dir,
                                  allow_patterns=[f"*{s}" for s in DATA_SUFFIXES]))


def split_files(folder: Path, split: str) -> list[Path]:
    """The data files of `split` in an HF dataset folder: `<split>.jsonl`, `data/<split>-0000x-of-0000n.parquet`, ..."""
    found = []
    for f in sorted(folder.rglob("*")):
        if not f.is_file() or not f.name.endswith(DATA_SUFFIXES) or ".cache" in f.parts:
            continue
        stem = f.name.split(".")[0]
        if stem == split or stem.startswith(f"{split}-") or f.parent.name == split:
            found.append(f)
    if not found:
        have = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())[:20]
        raise FileNotFoundError(f"no '{split}' data files in {folder} (files: {have})")
    return found


def read_records(files: Iterable[Path]) -> Iterable[dict]:
    for f in files:
        if f.name.endswith(".parquet"):
            import pyarrow.parquet as pq

            yield from pq.read_table(f).to_pylist()
        elif f.name.endswith(".jsonl"):
            with open(f, encoding="utf-8") as fh:
                for line in fh:
                    if line.strip():
                        yield json.loads(line)
        else:  # a JSON list of records
            data = json.loads(f.read_text(encoding="utf-8"))
            yield from (data if isinstance(data, list) else data.get("data", []))


def write_jsonl(rows: Iterable[dict], out: Path) -> int:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, out)
    return n


def prepare(name: str, out_root: str | Path = "data", source: str | Path | None = None,
            limit: int | None = None) -> dict[str, int]:
    """Write the Gym JSONL files of dataset `name`; returns {output file: rows}."""
    if name not in RECIPES:
        raise KeyError(f"unknown dataset '{name}' (known: {', '.join(RECIPES)})")
    recipe = RECIPES[name]
    folder = Path(source) if source else download(recipe.repo_id)
    written = {}
    for split, rel in recipe.splits.items():
        records = read_records(split_files(folder, split))
        rows = (recipe.row(ex, i) for i, ex in enumerate(records) if limit is None or i < limit)
        out = Path(out_root) / rel
        written[str(out)] = write_jsonl(rows, out)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="megagym data", description="prepare Gym JSONL datasets")
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="build Gym JSONL for a benchmark dataset")
    pp.add_argument("name", choices=sorted([*RECIPES, *GENERATORS]))
    pp.add_argument("--out", default="data", help="output root (default: data/ -> data/<name>/<split>.jsonl)")
    pp.add_argument("--source", help="a local folder with the dataset's parquet/JSONL files (default: the HF hub)")
    pp.add_argument("--limit", type=int, help="at most this many rows per split")
    a = p.parse_args(argv)
    try:
        if a.name in GENERATORS:
            import importlib

            written = importlib.import_module(GENERATORS[a.name]).prepare(a.out)
        else:
            written = prepare(a.name, a.out, a.source, a.limit)
    except (KeyError, FileNotFoundError, ValueError) as e:
        print(f"megagym data prepare: {e}", file=sys.stderr)
        return 2
    for path, n in written.items():
        print(f"megagym data prepare: {path}: {n} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
