"""Every loss of issue 4 against a hand computation of its formula on fixed tensors (python floats and
`math`, not the code under test): signs, the 1/2, reductions, margins, clamps."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_po.objectives import dcpo, dpo, dpo_sft, dro, kto, mapo, npo, robust_dpo, self_npo, sft

EW = [0.10, 0.30, 0.20]
EL = [0.20, 0.10, 0.20]
RW = [0.15, 0.25, 0.30]
RL = [0.15, 0.20, 0.10]


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def z_hand(beta: float) -> list[float]:
    return [-0.5 * beta * ((ew - el) - (rw - rl)) for ew, el, rw, rl in zip(EW, EL, RW, RL)]


def test_npo_is_dpo_with_its_beta_convention():
    beta = 1000.0
    total, m = npo.loss(t(EW), t(EL), t(RW), t(RL), beta=beta)
    want = sum(-math.log(sig(z)) for z in z_hand(beta)) / 3
    assert total.item() == pytest.approx(want, rel=1e-5)
    # NPO-SD1.5's beta 500 (diffusers script, no 1/2) is beta_dpo 1000 here; the SDXL script has the 1/2
    assert npo.beta_from_reference(500, has_half=False) == 1000.0
    assert npo.beta_from_reference(2000, has_half=True) == 2000.0
    # the diffusers SD1.5 form without the 1/2, at beta 500: -log sigmoid(500 * (ref_diff - model_diff))
    no_half = sum(-math.log(sig(500 * ((rw - rl) - (ew - el)))) for ew, el, rw, rl in zip(EW, EL, RW, RL)) / 3
    assert total.item() == pytest.approx(no_half, rel=1e-5)


def test_npo_method_turns_on_reversed_labels(tiny_sd):
    from diffusion_po.config import TrainConfig
    from diffusion_po.objectives import get_method_class

    cfg = TrainConfig(method="npo", pretrained_model_name_or_path=tiny_sd)
    assert not cfg.data.reverse_labels
    get_method_class("npo")(cfg)
    assert cfg.data.reverse_labels


def test_dcpo_loss_is_the_dpo_formula_at_its_beta():
    total, m = dcpo.loss(t(EW), t(EL), t(RW), t(RL), beta=500.0)
    want = sum(-math.log(sig(z)) for z in z_hand(500.0)) / 3
    assert total.item() == pytest.approx(want, rel=1e-5)
    assert m["implicit_acc"].item() == pytest.approx(sum(z > 0 for z in z_hand(500.0)) / 3)


def test_dro_hinge_margin_and_reduction():
    # d = (e_exp - r_exp) - (e_pol - r_pol)
    e_exp, e_pol, r_exp, r_pol = [0.2, 0.1, 0.5], [0.1, 0.3, 0.5], [0.1, 0.2, 0.5], [0.3, 0.1, 0.5]
    margin = 0.001
    d = [(a - c) - (b - e) for a, b, c, e in zip(e_exp, e_pol, r_exp, r_pol)]  # [0.3, -0.3, 0.0]
    want = sum(max(0.0, x + margin) for x in d) / 3  # (0.301 + 0 + 0.001) / 3
    total, m = dro.loss(t(e_exp), t(e_pol), t(r_exp), t(r_pol), margin=margin)
    assert total.item() == pytest.approx(want, rel=1e-5)
    assert want == pytest.approx(0.302 / 3)
    assert m["active"].item() == pytest.approx(2 / 3)
    # a pair ranked right by more than the margin gives zero loss and zero gradient
    e = t([0.0]).requires_grad_()
    total, _ = dro.loss(e, t([0.5]), t([0.1]), t([0.1]), margin=margin)
    total.backward()
    assert total.item() == 0.0 and e.grad.item() == 0.0
    # inside the margin the gradient w.r.t. the expert error is +1/B (lower expert error lowers the loss)
    e = t([0.1, 0.1]).requires_grad_()
    total, _ = dro.loss(e, t([0.1, 0.1]), t([0.1, 0.1]), t([0.1, 0.1]), margin=margin)
    total.backward()
    assert e.grad.tolist() == pytest.approx([0.5, 0.5])


def test_kto_sigmoid_halo_reference_point_and_lambdas():
    err, ref, labels = [0.10, 0.30, 0.20, 0.05], [0.20, 0.25, 0.10, 0.10], [1, 0, 1, 0]
    beta, ld, lu = 10.0, 2.0, 0.5
    g = [r - e for e, r in zip(err, ref)]  # [0.1, -0.05, -0.1, 0.05]
    z0 = max(0.0, sum(g) / 4)  # 0.0 -> clamped from 0
    want = 0.0
    for gi, y in zip(g, labels):
        s = 1 if y else -1
        want += (ld if y else lu) * (1 - sig(s * beta * (gi - z0)))
    want /= 4
    total, m = kto.loss(t(err), t(ref), t(labels), beta=beta, lambda_d=ld, lambda_u=lu)
    assert total.item() == pytest.approx(want, rel=1e-5)
    # a negative batch mean is clamped to 0; a positive one is subtracted
    g_pos_err = [0.0, 0.1]
    g_pos_ref = [0.3, 0.2]  # g = [0.3, 0.1], mean 0.2
    z0 = 0.2
    want = ((1 - sig(beta * (0.3 - z0))) + (1 - sig(-beta * (0.1 - z0)))) / 2
    total, m = kto.loss(t(g_pos_err), t(g_pos_ref), t([1, 0]), beta=beta)
    assert total.item() == pytest.approx(want, rel=1e-5)
    assert m["reference_point"].item() == pytest.approx(0.2)
    total_neg, m = kto.loss(t([0.3, 0.2]), t([0.0, 0.1]), t([1, 0]), beta=beta)
    assert m["reference_point"].item() == 0.0
    # the reference point is detached: the gradient is that of the halo with z0 held fixed
    e = t(g_pos_err).requires_grad_()
    total, _ = kto.loss(e, t(g_pos_ref), t([1, 0]), beta=beta)
    total.backward()
    # d/de_i of lambda (1 - sig(s beta (r - e - z0))) / 2 = lambda * s * beta * sig' / 2
    want_grad = []
    for gi, s in zip([0.3, 0.1], [1, -1]):
        p = sig(s * beta * (gi - z0))
        want_grad.append(s * beta * p * (1 - p) / 2)
    assert e.grad.tolist() == pytest.approx(want_grad, rel=1e-4)
    # an explicit (all-reduced) reference point is used, and clamped at 0
    total, m = kto.loss(t(g_pos_err), t(g_pos_ref), t([1, 0]), beta=beta, reference_point=torch.tensor(-3.0))
    assert m["reference_point"].item() == 0.0


def test_mapo_margin_snr_and_sft_term():
    ew, el = [0.1, 0.4], [0.3, 0.2]
    s, T, beta = 0.5, 1000, 0.1

    def r(e):
        return s * e / (math.exp(s * e) - 1)

    log_odds = [r(a) - r(b) for a, b in zip(ew, el)]
    want = sum(ew) / 2 - beta * sum(math.log(sig(T * lo)) for lo in log_odds) / 2
    total, m = mapo.loss(t(ew), t(el), beta=beta, snr_value=s, num_train_timesteps=T)
    assert total.item() == pytest.approx(want, rel=1e-5)
    assert m["sft_loss"].item() == pytest.approx(0.25)
    # lower winner error -> larger log-odds (the margin points the right way)
    assert log_odds[0] > 0 > log_odds[1]
    # zero error: the reference computes 0/0; we use the limit r(0) = 1 and stay finite
    total, m = mapo.loss(t([0.0]), t([0.0]))
    assert torch.isfinite(total) and m["log_odds"].item() == 0.0


def test_sft_mean_and_weighted_mean():
    total, _ = sft.loss(t([0.1, 0.3, 0.5]))
    assert total.item() == pytest.approx(0.3)
    total, _ = sft.loss(t([0.1, 0.3, 0.5]), t([1, 0, 1]))
    assert total.item() == pytest.approx(0.3)  # (0.1 + 0.5) / 2
    total, _ = sft.loss(t([0.1, 0.3]), t([0, 0]))
    assert total.item() == 0.0


def test_robust_dpo_debiasing_formula():
    beta, eps = 5000.0, 0.2
    want = sum(((1 - eps) * -math.log(sig(z)) - eps * -math.log(sig(-z))) / (1 - 2 * eps)
               for z in z_hand(beta)) / 3
    total, _ = robust_dpo.loss(t(EW), t(EL), t(RW), t(RL), beta=beta, epsilon=eps)
    assert total.item() == pytest.approx(want, rel=1e-5)
    # eps = 0 is Diffusion-DPO; and it agrees with dpo.loss's label_smoothing option
    total0, _ = robust_dpo.loss(t(EW), t(EL), t(RW), t(RL), beta=beta, epsilon=0.0)
    assert total0.item() == pytest.approx(sum(-math.log(sig(z)) for z in z_hand(beta)) / 3, rel=1e-5)
    via_dpo, _ = dpo.loss(t(EW), t(EL), t(RW), t(RL), beta=beta, label_smoothing=eps)
    assert via_dpo.item() == pytest.approx(want, rel=1e-5)
    # unbiasedness: with labels flipped w.p. eps, the expected robust loss equals the clean DPO loss
    zs = z_hand(beta)
    flipped, _ = robust_dpo.loss(t(EL), t(EW), t(RL), t(RW), beta=beta, epsilon=eps)
    expected = (1 - eps) * total.item() + eps * flipped.item()
    assert expected == pytest.approx(sum(-math.log(sig(z)) for z in zs) / 3, rel=1e-5)
    with pytest.raises(ValueError):
        robust_dpo.loss(t(EW), t(EL), t(RW), t(RL), epsilon=0.5)


def test_dpo_sft_adds_weighted_winner_error():
    beta, alpha = 5000.0, 0.7
    want = sum(-math.log(sig(z)) for z in z_hand(beta)) / 3 + alpha * sum(EW) / 3
    total, m = dpo_sft.loss(t(EW), t(EL), t(RW), t(RL), beta=beta, sft_weight=alpha)
    assert total.item() == pytest.approx(want, rel=1e-5)
    assert m["sft_loss"].item() == pytest.approx(0.2)


def test_self_npo_pieces():
    # DDIM grid of the reference: 39, 79, ..., 999
    grid = self_npo.ddim_grid(1000, 25)
    assert grid[0].item() == 39 and grid[-1].item() == 999 and len(grid) == 25
    assert (grid[1:] - grid[:-1]).eq(40).all()
    # guidance in the "Imagen + 1" convention: w = -1 gives the unconditional prediction
    c, u = t([1.0, 2.0]), t([0.5, -1.0])
    assert self_npo.guide(c, u, -1.0).tolist() == pytest.approx([0.5, -1.0])
    assert self_npo.guide(c, u, -5.0).tolist() == pytest.approx([-4 * 1.0 + 5 * 0.5, -4 * 2.0 + 5 * -1.0])
    # pseudo-Huber with c = 0.001, mean over C,H,W per sample
    pred = torch.tensor([[[[0.0, 0.1]]], [[[0.3, -0.3]]]])
    target = torch.zeros_like(pred)
    ch = 0.001
    want = [((0 + ch**2) ** 0.5 - ch + (0.01 + ch**2) ** 0.5 - ch) / 2, ((0.09 + ch**2) ** 0.5 - ch) * 2 / 2]
    got = self_npo.per_sample_distance(pred, target, ch)
    assert got.tolist() == pytest.approx(want, rel=1e-5)
    assert self_npo.per_sample_distance(pred, target, loss_type="l2").tolist() == pytest.approx([0.005, 0.09])
    total, _ = self_npo.loss(got)
    assert total.item() == pytest.approx(sum(want) / 2, rel=1e-5)


def test_self_npo_renoise_is_the_forward_kernel():
    # x_e at t_e from x0; re-noising to t' must give the marginal of t' given x0:
    # mean alpha' x0, variance sigma'^2 (in the noise-to-signal form of the reference).
    a_e, s_e, a_p, s_p = 0.9, math.sqrt(1 - 0.81), 0.5, math.sqrt(0.75)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.full((200000,), 2.0)
    x_e = a_e * x0 + s_e * torch.randn(200000, generator=gen)
    x_p = self_npo.renoise(x_e, torch.tensor(a_e), torch.tensor(s_e), torch.tensor(a_p), torch.tensor(s_p),
                           torch.randn(200000, generator=gen))
    assert x_p.mean().item() == pytest.approx(a_p * 2.0, abs=0.01)
    assert x_p.var().item() == pytest.approx(s_p**2, rel=0.02)
    # hand value of the formula on one number
    got = self_npo.renoise(torch.tensor(1.0), torch.tensor(a_e), torch.tensor(s_e), torch.tensor(a_p),
                           torch.tensor(s_p), torch.tensor(0.5))
    want = a_p * (1.0 / a_e + math.sqrt((s_p / a_p) ** 2 - (s_e / a_e) ** 2) * 0.5)
    assert got.item() == pytest.approx(want, rel=1e-6)
