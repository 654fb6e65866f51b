"""Diffusion-DPO formula against a hand computation."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_po.objectives import dpo


def hand_loss(ew, el, rw, rl, beta):
    total = 0.0
    zs = []
    for a, b, c, d in zip(ew, el, rw, rl):
        z = -0.5 * beta * ((a - b) - (c - d))
        zs.append(z)
        total += -math.log(1.0 / (1.0 + math.exp(-z)))
    return total / len(ew), zs


def test_dpo_matches_hand_computation():
    ew, el, rw, rl = [0.10, 0.30, 0.20], [0.20, 0.25, 0.20], [0.15, 0.30, 0.21], [0.15, 0.20, 0.20]
    beta = 20.0
    loss, metrics = dpo.loss(*(torch.tensor(v) for v in (ew, el, rw, rl)), beta=beta)
    expected, zs = hand_loss(ew, el, rw, rl, beta)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert float(metrics["implicit_acc"]) == pytest.approx(sum(z > 0 for z in zs) / 3)
    assert float(metrics["reward_margin"]) == pytest.approx(sum(zs) / 3, rel=1e-5)


def test_sign_lower_winner_error_lowers_loss():
    ref = torch.tensor([0.2]), torch.tensor([0.2])
    better, _ = dpo.loss(torch.tensor([0.1]), torch.tensor([0.2]), *ref, beta=100.0)
    worse, _ = dpo.loss(torch.tensor([0.3]), torch.tensor([0.2]), *ref, beta=100.0)
    assert better < math.log(2) < worse


def test_equal_policy_and_reference_gives_log2_and_half_accuracy():
    e = torch.rand(5)
    loss, m = dpo.loss(e, e.flip(0), e, e.flip(0), beta=5000.0)
    assert loss.item() == pytest.approx(math.log(2))
    assert float(m["implicit_acc"]) == pytest.approx(0.5)


def test_sft_weight_and_robust_variant():
    ew, el, rw, rl = torch.tensor([0.1, 0.4]), torch.tensor([0.2, 0.1]), torch.tensor([0.2, 0.2]), torch.tensor([0.2, 0.2])
    base, _ = dpo.loss(ew, el, rw, rl, beta=10.0)
    with_sft, _ = dpo.loss(ew, el, rw, rl, beta=10.0, sft_weight=0.5)
    assert with_sft.item() == pytest.approx(base.item() + 0.5 * ew.mean().item())
    eps = 0.1
    robust, _ = dpo.loss(ew, el, rw, rl, beta=10.0, label_smoothing=eps)
    z = [-5.0 * ((0.1 - 0.2) - 0.0), -5.0 * ((0.4 - 0.1) - 0.0)]
    nll = [math.log1p(math.exp(-v)) for v in z]
    nll_flip = [math.log1p(math.exp(v)) for v in z]
    expected = sum(((1 - eps) * a - eps * b) / (1 - 2 * eps) for a, b in zip(nll, nll_flip)) / 2
    assert robust.item() == pytest.approx(expected, rel=1e-6)


def test_computes_in_fp32_from_half_inputs():
    ew = torch.tensor([0.1234567], dtype=torch.float16)
    loss, _ = dpo.loss(ew, ew * 1.01, ew, ew, beta=5000.0)
    assert loss.dtype == torch.float32
