"""The fused vocab-parallel logprob / entropy function against torch.log_softmax (one TP rank)."""

from __future__ import annotations

import pytest
import torch

from megagym.trainer import logprobs as lp_mod


@pytest.fixture(autouse=True)
def single_tp_rank(monkeypatch):
    monkeypatch.setattr(lp_mod, "_tp", lambda: (None, 0, 1))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_entropy_and_grad_match_log_softmax(temperature):
    torch.manual_seed(0)
    vocab = 1000  # the 24 columns above it are Megatron's vocab padding: excluded
    x = torch.randn(2, 5, 1024, requires_grad=True)
    t = torch.randint(0, vocab, (2, 5))
    lp, ent = lp_mod.token_logprobs_and_entropy(x, t, temperature, vocab)
    ref_ls = torch.log_softmax(x[..., :vocab] / temperature, -1)
    ref = ref_ls.gather(-1, t[..., None])[..., 0]
    assert torch.allclose(lp, ref, atol=1e-6)
    assert torch.allclose(ent, -(ref_ls.exp() * ref_ls).sum(-1), atol=1e-5)
    w = torch.randn(2, 5)
    (g,) = torch.autograd.grad((lp * w).sum(), x)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), x)
    assert torch.allclose(g, g_ref, atol=1e-7) and g[..., vocab:].abs().max() == 0
    assert torch.equal(lp_mod.token_logprobs(x, t, temperature, vocab), lp)
    assert torch.allclose(lp_mod.entropy(x, temperature, vocab), ent)


def test_input_logits_are_not_modified():
    x = torch.randn(1, 3, 16)
    before = x.clone()
    lp_mod.token_logprobs_and_entropy(x, torch.zeros(1, 3, dtype=torch.long), 1.0, 10)
    assert torch.equal(x, before)
