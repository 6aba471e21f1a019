"""`megagym data prepare` on small local copies of the three HF datasets (same files, same code path).

The fixtures mimic each hub repo's layout: parquet shards under data/ for DAPO17k and AIME24 (as
`push_to_hub` writes them) and train/validation JSONL for the workplace assistant. The rows written
must be what Gym's own prepare scripts write and what megagym's dataset reader accepts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megagym.data import prepare as prep
from megagym.data.dataset import read_rows

GYM_WORKPLACE = Path(__file__).resolve().parents[1] / (
    ".venv-gym/lib/python3.13/site-packages/resources_servers/workplace_assistant/data/example.jsonl")


def _parquet(path: Path, records: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records), path)


@pytest.fixture
def dapo_dir(tmp_path):
    recs = [{"data_source": "math_dapo",
             "prompt": [{"content": f"Solve {i}+1. Put the answer in \\boxed{{}}.", "role": "user"}],
             "ability": "MATH", "reward_model": {"ground_truth": str(i + 1), "style": "rule-lighteval/MATH_v2"},
             "extra_info": {"index": str(i)}} for i in range(5)]
    _parquet(tmp_path / "dapo" / "data" / "train-00000-of-00001.parquet", recs)
    return tmp_path / "dapo"


@pytest.fixture
def aime_dir(tmp_path):
    recs = [{"id": 60 + i, "problem": f"Find {i} squared.", "solution": "...", "answer": str(i * i),
             "url": "https://example.org", "year": "2024"} for i in range(3)]
    _parquet(tmp_path / "aime" / "data" / "train-00000-of-00001.parquet", recs)
    return tmp_path / "aime"


@pytest.fixture
def workplace_dir(tmp_path):
    src = [json.loads(line) for line in GYM_WORKPLACE.read_text().splitlines() if line.strip()][:3]
    d = tmp_path / "workplace"
    d.mkdir()
    for split, rows in (("train", src[:2]), ("validation", src[2:])):
        with open(d / f"{split}.jsonl", "w") as f:
            for r in rows:  # the hub rows carry no id; ours are numbered like Gym's preprocess
                f.write(json.dumps({k: v for k, v in r.items() if k != "id"}) + "\n")
    return d


def test_dapo17k(dapo_dir, tmp_path):
    out = tmp_path / "out"
    assert prep.main(["prepare", "dapo17k", "--source", str(dapo_dir), "--out", str(out)]) == 0
    rows = read_rows(out / "dapo17k" / "train.jsonl")
    assert len(rows) == 5
    assert rows[2] == {"responses_create_params": {"input": [
        {"role": "user", "content": "Solve 2+1. Put the answer in \\boxed{}."}]},
        "question": "Solve 2+1. Put the answer in \\boxed{}.", "expected_answer": "3"}


def test_aime24(aime_dir, tmp_path):
    written = prep.prepare("aime24", tmp_path / "out", aime_dir)
    path = tmp_path / "out" / "aime24" / "validation.jsonl"
    assert written == {str(path): 3}
    row = read_rows(path)[1]
    sys_msg, user = row["responses_create_params"]["input"]
    assert sys_msg["role"] == "system" and "\\boxed{}" in sys_msg["content"]
    assert user == {"role": "user", "content": "Find 1 squared."}
    assert row["expected_answer"] == "1" and row["question"] == "Find 1 squared."


def test_workplace_assistant_matches_gym_rows(workplace_dir, tmp_path):
    prep.prepare("workplace_assistant", tmp_path / "out", workplace_dir)
    gym = [json.loads(line) for line in GYM_WORKPLACE.read_text().splitlines() if line.strip()][:3]
    train = read_rows(tmp_path / "out" / "workplace_assistant" / "train.jsonl")
    val = read_rows(tmp_path / "out" / "workplace_assistant" / "validation.jsonl")
    assert [r["id"] for r in train] == [0, 1] and [r["id"] for r in val] == [0]
    for mine, theirs in zip(train + val, gym):
        for key in ("responses_create_params", "ground_truth", "category", "environment_name"):
            assert mine[key] == theirs[key], key
    assert train[0]["responses_create_params"]["tools"], "the tools travel with each row"


def test_hub_path_downloads_then_reads_the_same_files(monkeypatch, aime_dir, tmp_path):
    calls = []

    def fake_snapshot_download(repo_id, **kw):
        calls.append((repo_id, kw["repo_type"]))
        return str(aime_dir)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    prep.prepare("aime24", tmp_path / "out", limit=2)
    assert calls == [("HuggingFaceH4/aime_2024", "dataset")]
    assert len(read_rows(tmp_path / "out" / "aime24" / "validation.jsonl")) == 2


def test_missing_split_names_the_files(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "README.md").write_text("x")
    assert prep.main(["prepare", "workplace_assistant", "--source", str(tmp_path / "src"),
                      "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out" / "workplace_assistant" / "train.jsonl").exists()
