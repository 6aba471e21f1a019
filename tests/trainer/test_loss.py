"""GRPO advantages and token loss, pure torch (no megatron)."""

from __future__ import annotations

import math

import pytest
import torch

from megagym.trainer.advantages import compute_advantages, group_advantages
from megagym.trainer.loss import grpo_token_loss, k3


def test_advantages_mean_baseline_and_std():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), normalize_std=False)
    assert adv.tolist() == [0.5, -0.5, -0.5, 0.5]
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), normalize_std=True, eps=0.0)
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std().item()
    assert adv.tolist() == pytest.approx([0.5 / std, -0.5 / std, -0.5 / std, 0.5 / std])


def test_advantages_leave_one_out():
    adv = group_advantages(torch.tensor([3.0, 0.0, 0.0]), normalize_std=False, leave_one_out=True)
    assert adv.tolist() == pytest.approx([3.0, -1.5, -1.5])


def test_equal_rewards_give_zero_advantage_and_groups_are_separate():
    adv = compute_advantages([1.0, 1.0, 0.0, 2.0], [0, 0, 1, 1], normalize_std=True)
    assert adv[0] == 0.0 and adv[1] == 0.0
    assert adv[2] < 0 < adv[3]
    with pytest.raises(ValueError):
        compute_advantages([1.0], [0, 1])


def test_on_policy_gradient_is_advantage_times_grad_logp():
    logp = torch.tensor([-1.0, -2.0], requires_grad=True)
    tl = grpo_token_loss(logp, logp.detach(), logp.detach(), torch.tensor([2.0, -1.0]), tis_threshold=None)
    tl.loss.sum().backward()
    assert logp.grad.tolist() == pytest.approx([-2.0, 1.0])
    assert tl.clipped.sum() == 0 and tl.gen_k3.abs().max() < 1e-12


def test_asymmetric_clip():
    old = torch.zeros(4)
    # ratios 1.3 (A>0: clipped above 1.28), 1.25 (A>0: inside), 0.7 (A<0: clipped below 0.8), 0.85 (A<0: inside)
    logp = torch.log(torch.tensor([1.3, 1.25, 0.7, 0.85])).requires_grad_()
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    tl = grpo_token_loss(logp, old, old, adv, clip_low=0.2, clip_high=0.28, tis_threshold=None)
    assert tl.clipped.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert tl.loss[0].item() == pytest.approx(-1.28)
    assert tl.loss[2].item() == pytest.approx(0.8)
    tl.loss.sum().backward()
    assert logp.grad[0] == 0 and logp.grad[2] == 0 and logp.grad[1] != 0 and logp.grad[3] != 0


def test_truncated_importance_weight():
    old = torch.tensor([-1.0, -1.0])
    gen = torch.tensor([-3.0, -1.1])  # exp(2) > 2 -> truncated; exp(0.1) kept
    tl = grpo_token_loss(old.clone().requires_grad_(), old, gen, torch.ones(2), tis_threshold=2.0)
    assert tl.is_weight.tolist() == pytest.approx([2.0, math.exp(0.1)])
    assert tl.gen_abs_diff.tolist() == pytest.approx([2.0, 0.1])
    off = grpo_token_loss(old.clone(), old, gen, torch.ones(2), tis_threshold=None)
    assert off.is_weight.tolist() == [1.0, 1.0]


def test_a_sample_spanning_two_weight_versions_weighs_each_token_by_its_own_behaviour_policy():
    """Async mode: a generation frozen at a weight swap has its first k tokens from version a and
    the rest from version b. Each token's generation logprob is the one its own version gave, so
    truncated importance sampling corrects each token against its own behaviour policy: the loss
    of the whole sample is the sum of the losses of its two parts, each with its own version."""
    torch.manual_seed(0)
    vocab, n, k = 11, 8, 3
    a, b, now = (torch.randn(n, vocab) for _ in range(3))  # logits of versions a, b and the trainer's
    tokens = torch.randint(vocab, (n,))
    pick = lambda logits: torch.log_softmax(logits, -1).gather(1, tokens[:, None])[:, 0]  # noqa: E731
    gen = torch.cat([pick(a)[:k], pick(b)[k:]])  # what the engine reported, per token
    logp = pick(now).requires_grad_()
    adv = torch.full((n,), 0.7)
    whole = grpo_token_loss(logp, logp.detach(), gen, adv, tis_threshold=2.0)
    first = grpo_token_loss(logp[:k], logp[:k].detach(), pick(a)[:k], adv[:k], tis_threshold=2.0)
    rest = grpo_token_loss(logp[k:], logp[k:].detach(), pick(b)[k:], adv[k:], tis_threshold=2.0)
    assert torch.allclose(whole.loss, torch.cat([first.loss, rest.loss]), atol=1e-7)
    expect = torch.clamp(torch.exp(logp.detach() - gen), max=2.0)
    assert torch.allclose(whole.is_weight, expect, atol=1e-7)
    # the stale part is weighted against version a, not b: swapping them changes the weights
    wrong = grpo_token_loss(logp, logp.detach(), pick(b), adv, tis_threshold=2.0)
    assert not torch.allclose(wrong.is_weight[:k], whole.is_weight[:k])


def test_kl_term_and_k3():
    assert k3(torch.tensor([0.0]), torch.tensor([0.0])).item() == 0.0
    assert k3(torch.tensor([-1.0]), torch.tensor([-2.0])).item() > 0
    logp = torch.tensor([-1.0], requires_grad=True)
    tl = grpo_token_loss(logp, logp.detach(), logp.detach(), torch.zeros(1), tis_threshold=None, kl_coef=0.5,
                         ref=torch.tensor([-2.0]))
    assert tl.loss.item() == pytest.approx(0.5 * (math.exp(-1.0) + 1.0 - 1.0))
    with pytest.raises(ValueError):
        grpo_token_loss(logp, logp.detach(), logp.detach(), torch.zeros(1), kl_coef=0.1)
