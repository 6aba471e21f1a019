"""Unit tests for bucket packing, manifests and /dev/shm segments (no vLLM)."""

from __future__ import annotations

import os

import pytest
import torch

from megagym.weights.sync.buckets import (
    ALIGN,
    ShmSegment,
    iter_buckets,
    leaked_segments,
    pack_into,
    plan,
    unpack,
)


def _tensors():
    g = torch.Generator().manual_seed(0)
    return [
        ("a.weight", torch.randn(7, 5, generator=g)),
        ("b.weight", torch.randn(3, generator=g).to(torch.bfloat16)),
        ("c.weight", torch.randn(4, 6, generator=g).t()),  # non-contiguous
        ("d.weight", torch.randn(100, generator=g, dtype=torch.float64)),
    ]


def test_pack_unpack_roundtrip_keeps_dtype_shape_values():
    tensors = _tensors()
    m = plan(tensors)
    assert all(off % ALIGN == 0 for off in m.offsets)
    buf = torch.zeros(m.total_bytes, dtype=torch.uint8)
    manifest = pack_into(buf, tensors)
    out = unpack(buf, manifest.to_dict())
    for (n1, t1), (n2, t2) in zip(tensors, out):
        assert n1 == n2 and t1.dtype == t2.dtype and t1.shape == t2.shape
        assert torch.equal(t1, t2)


def test_iter_buckets_respects_size_keeps_order_and_big_tensors_travel_alone():
    tensors = [(f"t{i}", torch.zeros(64)) for i in range(10)]  # 256 B each
    tensors.insert(3, ("big", torch.zeros(10_000)))
    buckets = list(iter_buckets(tensors, bucket_bytes=1024))
    assert [n for b in buckets for n, _ in b] == [n for n, _ in tensors]
    assert ["big"] in [[n for n, _ in b] for b in buckets]
    assert all(plan(b).total_bytes <= 1024 for b in buckets if len(b) > 1)


def test_iter_buckets_never_splits_a_decoder_layer():
    names = ["model.embed_tokens.weight"] + [
        f"model.layers.{i}.{p}" for i in range(4) for p in ("self_attn.q_proj.weight", "mlp.up_proj.weight")
    ] + ["model.norm.weight"]
    tensors = [(n, torch.zeros(100)) for n in names]  # 448 aligned bytes each, a layer is 896
    for bucket_bytes in (100, 1000, 2000, 5000):
        buckets = [[n for n, _ in b] for b in iter_buckets(tensors, bucket_bytes)]
        assert [n for b in buckets for n in b] == names
        for i in range(4):
            holding = [b for b in buckets if any(n.startswith(f"model.layers.{i}.") for n in b)]
            assert len(holding) == 1, (bucket_bytes, buckets)
    assert len(list(iter_buckets(tensors, 2000))) == 3  # embed+l0 | l1+l2 | l3+norm


def test_iter_buckets_rejects_duplicate_names_and_non_tensors():
    with pytest.raises(ValueError, match="twice"):
        list(iter_buckets([("x", torch.zeros(1)), ("x", torch.zeros(1))], 1024))
    with pytest.raises(TypeError, match="'y'"):
        list(iter_buckets([("y", [1.0])], 1024))


def test_unpack_rejects_out_of_range_manifest():
    buf = torch.zeros(128, dtype=torch.uint8)
    bad = {"names": ["x"], "dtype_names": ["float32"], "shapes": [[64]], "offsets": [0]}
    with pytest.raises(ValueError, match="outside"):
        unpack(buf, bad)


def test_shm_segment_shared_between_owner_and_attacher_and_cleaned_up():
    seg = ShmSegment.create(4096, tag="test-")
    try:
        assert os.path.basename(seg.path) in leaked_segments(os.getpid())
        tensors = _tensors()
        m = pack_into(seg.tensor, tensors)
        other = ShmSegment.attach(seg.path, seg.size)
        out = unpack(other.tensor, m)
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(tensors, out))
        del out
        other.close()
        assert os.path.exists(seg.path)  # attachers never unlink
    finally:
        seg.close()
    assert leaked_segments(os.getpid()) == []


def test_attach_refuses_foreign_paths():
    with pytest.raises(ValueError, match="not a megagym"):
        ShmSegment.attach("/etc/passwd", 10)


def test_orphaned_segments_of_dead_processes_are_removed():
    import subprocess
    import sys

    from megagym.weights.sync.buckets import SHM_DIR, SHM_PREFIX, remove_orphaned_segments

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    path = os.path.join(SHM_DIR, f"{SHM_PREFIX}{int(dead.stdout)}-0-test")
    open(path, "wb").close()
    mine = ShmSegment.create(64, tag="alive-")
    try:
        assert os.path.basename(path) in remove_orphaned_segments()
        assert not os.path.exists(path) and os.path.exists(mine.path)
    finally:
        mine.close()
