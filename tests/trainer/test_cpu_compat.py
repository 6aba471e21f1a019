"""Each CPU compatibility patch is still needed (its CUDA call is still in the installed
megatron-core: when an upgrade removes it, this test names the patch to delete) and works on CPU."""

from __future__ import annotations

import pytest
import torch

from megagym.trainer import cpu_compat

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the layer is inactive with CUDA")


@pytest.mark.parametrize("patch", cpu_compat.PATCHES, ids=lambda p: p.name)
def test_patch_still_needed(patch):
    assert patch.source_has_pattern(), (
        f"megatron-core no longer contains {patch.pattern!r} in {patch.module}: "
        f"patch '{patch.name}' may be obsolete ({patch.why})")


def test_activate_applies_every_patch_once():
    names = cpu_compat.activate()
    assert names == [p.name for p in cpu_compat.PATCHES]
    assert cpu_compat.activate() == names and cpu_compat.active()


def test_patched_calls_work_on_cpu():
    cpu_compat.activate()
    from megatron.core.transformer import utils as tutils

    mask = tutils.get_default_causal_mask(4)
    assert mask.device.type == "cpu" and mask.shape == (4, 4)
    from megatron.core.utils import GlobalMemoryBuffer

    assert GlobalMemoryBuffer().get_tensor((2, 3), torch.float32, "x").device.type == "cpu"
    from megatron.core.tensor_parallel import random as tp_random

    tp_random.initialize_rng_tracker(force_reset=True)
    tracker = tp_random.get_cuda_rng_tracker()
    tracker.add("megagym-test", 1234)
    with tracker.fork("megagym-test"):
        a = torch.rand(3)
    with tracker.fork("megagym-test"):
        b = torch.rand(3)
    assert not torch.equal(a, b)  # the forked stream advances


def test_cuda_type_names_only_inside_context():
    t = torch.zeros(2)
    with cpu_compat._cuda_tensor_methods():
        assert t.type() == "torch.cuda.FloatTensor" and t.cuda() is t
    assert t.type() == "torch.FloatTensor"


def test_proxy_moves_cuda_factories_to_cpu():
    p = cpu_compat._PROXY
    assert p.zeros(2, device="cuda").device.type == "cpu"
    assert p.tensor([1], device=torch.device("cuda", 0)).device.type == "cpu"
    assert p.cuda.current_device() == torch.device("cpu")
    p.cuda.synchronize()
    assert p.float32 is torch.float32
