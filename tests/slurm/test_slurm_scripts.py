"""The batch scripts in slurm/ on a real single-node Slurm (installed from Debian's packages if missing).

CPU variants only through variables: MEGAGYM_CONFIG=configs/tiny_cpu.yaml, tiny overrides, no GPU
request (the scripts carry none in #SBATCH lines). One training run serves all three tests:
  - slurm/train_dapo.sh: preempted after its first checkpoint (USR1 to the batch shell, as Slurm's
    `--signal=B:USR1@...` would send), requeues itself, resumes and finishes at the requested step,
    with one log per component per start; a second submission chained with --dependency=singleton
    waits for it and exits at once because the run is finished.
  - slurm/convert_hf.sh under `sbatch -W`: the run's latest checkpoint -> an HF folder.
  - slurm/eval_array.sh: a job array over the run's two checkpoints, one result file per task, and
    the merge job's table and plot.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.slurm.local_cluster import LocalSlurm

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
TINY = ["train.steps=4", "train.prompts_per_step=4", "rollout.n=4", "rollout.max_output_tokens=8",
        "checkpoint.every_steps=2", "checkpoint.keep_last=3", "val.before_training=false",
        "val.limit=2", "val.n=2", "optim.total_steps=4"]


def _run(cmd: list[str], env: dict, timeout: float = 120) -> str:
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert out.returncode == 0, f"{cmd}: {out.stdout}\n{out.stderr}"
    return out.stdout


def job_info(env: dict, job: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True)
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def wait_for(pred, timeout: float, what: str, every: float = 2.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _leftovers(marker: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if marker in line and "ps -eo" not in line]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with LocalSlurm(tmp_path_factory.mktemp("slurm")) as c:
        yield c


@pytest.fixture(scope="module")
def trained(cluster, module_tmp):
    """A tiny run trained by slurm/train_dapo.sh through a preemption + requeue; returns its facts."""
    base = module_tmp / "train"
    base.mkdir()
    run = base / "run"
    env = dict(cluster.env, MEGAGYM_REPO=str(REPO), MEGAGYM_CONFIG="configs/tiny_cpu.yaml",
               MEGAGYM_OUTPUT_DIR=str(run),
               MEGAGYM_OVERRIDES=" ".join([f"model.hf_path=tiny-random:{base / 'model'}", *TINY]))
    sb = ["sbatch", "--parsable", f"--output={base}/job-%j.out", "slurm/train_dapo.sh"]
    first = _run(sb, env).strip()
    second = _run(["sbatch", "--parsable", "--dependency=singleton", f"--output={base}/job-%j.out",
                   "slurm/train_dapo.sh"], env).strip()
    ckpt = run / "checkpoints" / "step_00000002"

    def first_checkpoint():
        info = job_info(env, first)
        assert info.get("JobState") in ("PENDING", "RUNNING"), (info, _tail(base, first))
        return (ckpt / "COMPLETE").exists()

    wait_for(first_checkpoint, 900, "the first checkpoint")
    assert job_info(env, second)["JobState"] == "PENDING"  # singleton: waits for the first job
    assert job_info(env, second).get("Reason") == "Dependency"
    # what `#SBATCH --signal=B:USR1@180` delivers ahead of a time limit or preemption
    _run(["scancel", "--batch", "--signal=USR1", first], env)
    info = wait_for(lambda: (i := job_info(env, first)).get("Restarts", "0") != "0"
                    and i.get("JobState") in ("PENDING", "RUNNING") and i, 300, "the requeue")
    if info["JobState"] == "PENDING":  # Slurm holds a requeued job ~2 minutes (BeginTime): skip that
        _run(["scontrol", "update", f"JobId={first}", "StartTime=now"], env)
    done = wait_for(lambda: job_info(env, first).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
                    and job_info(env, first), 1200, "the resumed job to end", every=3)
    assert done["JobState"] == "COMPLETED", (done, _tail(base, first))
    last = wait_for(lambda: job_info(env, second).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED")
                    and job_info(env, second), 300, "the chained job to end")
    return {"env": env, "base": base, "run": run, "first": first, "second": second, "first_end": done,
            "second_info": last}


def _tail(base: Path, job: str, n: int = 60) -> str:
    f = base / f"job-{job}.out"
    return "\n".join(f.read_text(errors="replace").splitlines()[-n:]) if f.exists() else "(no output)"


def test_train_requeues_resumes_and_chains(trained):
    run, base, first = trained["run"], trained["base"], trained["first"]
    out = (base / f"job-{first}.out").read_text()
    assert "USR1" in out and "requeueing" in out, out
    assert "restart 1" in out and "resuming from" in out, out
    assert (run / "checkpoints" / "step_00000004" / "COMPLETE").exists()
    # one log per component per start: r0 (preempted after step 2) and r1 (resumed, finished)
    for restart in ("r0", "r1"):
        logs = run / "logs" / f"slurm-{first}-{restart}"
        for name in ("trainer_0.log", "server_0.log", "gym/gym.log"):
            assert (logs / name).stat().st_size > 0, (logs / name)
    resumed = (run / "logs" / f"slurm-{first}-r1" / "trainer_0.log").read_text()
    at = re.search(r"resumed from \S+/step_(\d+) at step (\d+)", resumed)
    assert at and int(at.group(2)) >= 2, resumed[-3000:]  # the preempted start got past its first checkpoint
    steps = [json.loads(line)["step"] for line in (run / "batches.jsonl").read_text().splitlines()]
    assert sorted(set(steps)) == [1, 2, 3, 4] and steps[-1] == 4, steps
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val/reward_mean" in m and m["step"] == 4 for m in metrics)
    # the chained job started after the first ended and found nothing to do
    second = trained["second_info"]
    assert second["JobState"] == "COMPLETED"
    assert second["StartTime"] >= trained["first_end"]["EndTime"]
    assert "already finished" in (base / f"job-{trained['second']}.out").read_text()
    assert not _leftovers(str(run)), _leftovers(str(run))


def test_convert_hf_with_sbatch_wait(trained):
    out = trained["base"] / "hf"
    _run(["sbatch", "-W", f"--output={trained['base']}/convert-%j.out", "slurm/convert_hf.sh",
          str(trained["run"]), str(out)], trained["env"], timeout=600)
    assert (out / "config.json").exists() and (out / "model.safetensors").stat().st_size > 1000
    log = next(trained["base"].glob("convert-*.out")).read_text()
    assert "step_00000004" in log, log


def test_eval_array_and_merge(trained):
    ev = trained["base"] / "eval"
    env = dict(trained["env"], MEGAGYM_EVAL_DIR=str(ev), MEGAGYM_ARRAY_LIMIT="1",
               MEGAGYM_OVERRIDES="val.limit=2 val.n=2 rollout.max_output_tokens=8")
    env.pop("SLURM_JOB_ID", None)
    ck = trained["run"] / "checkpoints"  # the preempted start may have left a third checkpoint
    out = _run(["bash", "slurm/eval_array.sh", str(ck / "step_00000002"), str(ck / "step_00000004")], env)
    array, merge = out.split()[-2:]
    info = wait_for(lambda: job_info(env, merge).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED")
                    and job_info(env, merge), 1200, "the merge job", every=3)
    assert info["JobState"] == "COMPLETED", (info, list(ev.glob("slurm-*.out")))
    results = [json.loads((ev / f"result_{i}.json").read_text()) for i in (0, 1)]
    assert [r["step"] for r in results] == [2, 4]
    for r in results:
        assert r["prompts"] == 2 and r["val_n"] == 2 and 0.0 <= r["pass@1"] <= 1.0
        assert r["samples"] + r["failed_rollouts"] == 4
    table = (ev / "summary.md").read_text()
    assert "step_00000002" in table and "step_00000004" in table
    assert (ev / "summary.csv").exists() and (ev / "summary.png").stat().st_size > 2000
    assert len(list(ev.glob(f"slurm-{array}_*.out"))) == 2
