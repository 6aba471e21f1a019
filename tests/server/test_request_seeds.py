"""Derived per-request sampling seeds (megagym.server.request_seeds): the same sequence of requests
gives the same seeds, and no seed is given twice."""

from __future__ import annotations

from megagym.server.request_seeds import SEED_BITS, RequestSeeds


def _run(seeds: RequestSeeds, requests) -> list[int]:
    return [seeds.derive(prompt, version) for prompt, version in requests]


REQUESTS = [([1, 2, 3], 0)] * 4 + [([1, 2, 4], 0), ([1, 2, 3], 0), ([1, 2, 3], 1), ([1, 2, 3], 1), ([7], 1)]


def test_repeatable_and_distinct():
    a, b = _run(RequestSeeds(11), REQUESTS), _run(RequestSeeds(11), REQUESTS)
    assert a == b  # another run of the same server
    assert len(set(a)) == len(a)  # copies of a prompt, other prompts, other versions: all different
    assert all(0 <= s < 2 ** SEED_BITS for s in a)
    assert set(_run(RequestSeeds(12), REQUESTS)).isdisjoint(a)  # another server of the run


def test_a_new_version_restarts_the_counts():
    seeds = RequestSeeds(3)
    v0 = _run(seeds, [([5, 6], 0)] * 3)
    v1 = _run(seeds, [([5, 6], 1)] * 3)
    assert seeds.seen == {next(iter(seeds.seen)): 3}  # only the current version's prompts are kept
    assert v1 == _run(RequestSeeds(3), [([5, 6], 1)] * 3)  # counts from 0 again under version 1
    assert set(v0).isdisjoint(v1)


def test_bounded_table_never_repeats_a_seed():
    seeds = RequestSeeds(0, max_prompts=4)
    given = _run(seeds, [([p], 0) for p in range(4)] + [([0], 0)] + [([p], 0) for p in range(10)])
    assert len(seeds.seen) <= 4 and seeds.epoch >= 2
    assert len(set(given)) == len(given)  # prompt 0 after the table emptied: a new epoch, a new seed


def test_each_server_of_a_run_has_its_own_seed():
    """The servers of one run (local or one per Slurm task) derive from different seeds."""
    from megagym.config.loader import build
    from megagym.config.schema import RunConfig
    from megagym.launch.servers import server_overrides

    def seed(cfg, index):
        return [o for o in server_overrides(cfg, index) if o.startswith("seed=")]

    cfg = build(RunConfig, {"run": {"seed": 7}, "model": {"hf_path": "m"}})
    assert [seed(cfg, i) for i in range(3)] == [["seed=7"], ["seed=8"], ["seed=9"]]
    cfg = build(RunConfig, {"run": {"seed": 7}, "model": {"hf_path": "m"}, "servers": {"settings": {"seed": 100}}})
    assert seed(cfg, 1) == ["seed=101"]
