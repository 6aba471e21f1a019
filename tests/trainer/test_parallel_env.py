"""Rank layout from torchrun or Slurm variables (pure environment parsing)."""

from __future__ import annotations

import pytest

from megagym.trainer.parallel import read_env

KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
        "SLURM_LOCALID", "SLURM_JOB_ID", "SLURM_LAUNCH_NODE_IPADDR")


@pytest.fixture
def clean_env(monkeypatch):
    for k in KEYS:
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def test_torchrun(clean_env):
    for k, v in dict(RANK="3", WORLD_SIZE="4", LOCAL_RANK="1", MASTER_ADDR="10.0.0.2", MASTER_PORT="29500").items():
        clean_env.setenv(k, v)
    e = read_env()
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port) == (3, 4, 1, "10.0.0.2", 29500)


def test_slurm(clean_env):
    for k, v in dict(SLURM_PROCID="5", SLURM_NTASKS="8", SLURM_LOCALID="1", SLURM_JOB_ID="123",
                     SLURM_LAUNCH_NODE_IPADDR="10.1.2.3").items():
        clean_env.setenv(k, v)
    e = read_env()
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port) == (5, 8, 1, "10.1.2.3", 20124)  # slurm/train.sh: 20001 + job % 10000


def test_single_process_and_missing_port(clean_env):
    e = read_env()
    assert (e.rank, e.world_size) == (0, 1) and e.master_port > 0
    clean_env.setenv("RANK", "0")
    clean_env.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="MASTER_PORT"):
        read_env()
