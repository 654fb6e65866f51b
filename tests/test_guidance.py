"""Guidance formulas against hand computations on fixed tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusion_po.guidance import (
    CFG,
    NPO,
    POS0,
    UNCOND,
    Branch,
    Composable,
    PerpNeg,
    cfg,
    composable,
    make_guidance,
    npo_cfg,
    perp,
    perp_neg,
    rescale_noise_cfg,
)


def _rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def _np_perp(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Hand computation for one sample, with explicit loops over the flattened entries."""
    uf, vf = u.ravel().astype(np.float64), v.ravel().astype(np.float64)
    dot = sum(a * b for a, b in zip(uf, vf))
    vv = sum(b * b for b in vf)
    if vv == 0:
        return u.astype(np.float64)
    return (uf - dot / vv * vf).reshape(u.shape)


def test_cfg_formula():
    u, c = _rand(2, 4, 3, 3, seed=1), _rand(2, 4, 3, 3, seed=2)
    out = cfg(u, c, 7.5)
    assert torch.allclose(out, u + 7.5 * (c - u), atol=1e-5)
    assert torch.allclose(cfg(u, c, 1.0), c, atol=1e-6)
    assert torch.allclose(cfg(u, c, 0.0), u)
    assert torch.equal(npo_cfg(u, c, 7.5), out)


def test_perp_is_per_sample_not_over_batch():
    u, v = _rand(3, 4, 5, 5, seed=3), _rand(3, 4, 5, 5, seed=4)
    v[1] *= 100.0  # a batch-wide dot product would let this sample dominate the others
    got = perp(u, v).numpy()
    for i in range(3):
        want = _np_perp(u[i].numpy(), v[i].numpy())
        np.testing.assert_allclose(got[i], want, rtol=1e-4, atol=1e-5)
        # the result is orthogonal to v, sample by sample
        assert abs(float((got[i] * v[i].numpy()).sum())) < 1e-2 * float(np.abs(v[i].numpy()).sum())
    # the reference's batch-wide projection gives something else
    coef = (u * v).sum() / (v * v).sum()
    assert not np.allclose(got, (u - coef * v).numpy(), atol=1e-3)


def test_perp_zero_norm_guard():
    u = _rand(2, 4, 3, 3, seed=5)
    v = _rand(2, 4, 3, 3, seed=6)
    v[0] = 0.0
    out = perp(u, v)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0], u[0])  # nothing to project on: the negative acts fully
    np.testing.assert_allclose(out[1].numpy(), _np_perp(u[1].numpy(), v[1].numpy()), rtol=1e-4, atol=1e-5)


def test_perp_neg_against_hand_computation_several_prompts():
    b, shape = 2, (4, 3, 3)
    e0, p0, p1, n0, n1 = (_rand(b, *shape, seed=s) for s in range(10, 15))
    a = torch.tensor([[0.5], [2.0]])  # per-sample weight of the extra positive
    bw = torch.tensor([[1.5, 0.25], [1.0, 3.0]])  # per-sample weights of two negatives
    s = 6.0
    got = perp_neg(e0, [p0, p1], [n0, n1], s, a, bw).numpy()
    for i in range(b):
        E0, P0, P1, N0, N1 = (t[i].numpy().astype(np.float64) for t in (e0, p0, p1, n0, n1))
        d = P0 - E0
        total = d + a[i, 0].item() * _np_perp(P1 - E0, d)
        total -= bw[i, 0].item() * _np_perp(N0 - E0, d) + bw[i, 1].item() * _np_perp(N1 - E0, d)
        np.testing.assert_allclose(got[i], E0 + s * total, rtol=1e-4, atol=1e-4)


def test_perp_neg_extra_positive_uses_its_own_weight():
    """The reference SD pipeline gives positive j the weight of prompt j-1 (off by one)."""
    e0, p0, p1 = (_rand(1, 4, 2, 2, seed=s) for s in (20, 21, 22))
    d = p0 - e0
    zero = perp_neg(e0, [p0, p1], [], 3.0, torch.tensor([0.0]))
    assert torch.allclose(zero, e0 + 3.0 * d, atol=1e-5)  # a_1 = 0 removes the extra positive entirely
    one = perp_neg(e0, [p0, p1], [], 3.0, torch.tensor([2.0]))
    assert torch.allclose(one, e0 + 3.0 * (d + 2.0 * perp(p1 - e0, d)), atol=1e-5)


def test_orthogonal_negative_acts_fully_parallel_not_at_all():
    e0 = torch.zeros(1, 1, 2, 2)
    pos = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])  # d_pos along the first entry
    orth = torch.tensor([[[[0.0, 2.0], [0.0, 0.0]]]])
    par = 3.0 * pos
    s, w = 5.0, 1.5
    # orthogonal: Perp-Neg subtracts the whole negative, like composable guidance
    got = perp_neg(e0, [pos], [orth], s, neg_weights=torch.tensor([w]))
    assert torch.allclose(got, s * (pos - w * orth))
    assert torch.allclose(got, composable(e0, [pos], [orth], s, neg_weights=torch.tensor([w])))
    # parallel: Perp-Neg removes nothing; composable would cancel the main prompt
    got = perp_neg(e0, [pos], [par], s, neg_weights=torch.tensor([w]))
    assert torch.allclose(got, s * pos)
    assert not torch.allclose(composable(e0, [pos], [par], s, neg_weights=torch.tensor([w])), s * pos)
    # mixed: only the orthogonal part acts
    got = perp_neg(e0, [pos], [par + orth], s, neg_weights=torch.tensor([w]))
    assert torch.allclose(got, s * (pos - w * orth), atol=1e-6)


def test_perp_neg_zero_d_pos_acts_like_composable():
    e0 = _rand(2, 4, 3, 3, seed=30)
    p0 = e0.clone()  # d_pos = 0 for both samples
    n0 = _rand(2, 4, 3, 3, seed=31)
    got = perp_neg(e0, [p0], [n0], 4.0, neg_weights=torch.tensor([2.0]))
    assert torch.isfinite(got).all()
    assert torch.allclose(got, e0 - 4.0 * 2.0 * (n0 - e0), atol=1e-5)


def test_composable_formula():
    e0, p0, p1, n0 = (_rand(2, 4, 2, 2, seed=s) for s in (40, 41, 42, 43))
    got = composable(e0, [p0, p1], [n0], 3.0, torch.tensor([0.5]), torch.tensor([2.0]))
    want = e0 + 3.0 * ((p0 - e0) + 0.5 * (p1 - e0) - 2.0 * (n0 - e0))
    assert torch.allclose(got, want, atol=1e-5)


def test_rescale_matches_lin_et_al_and_diffusers():
    from diffusers.guiders.guider_utils import rescale_noise_cfg as diffusers_rescale

    guided, cond = _rand(3, 4, 5, 5, seed=50) * 3, _rand(3, 4, 5, 5, seed=51)
    phi = 0.7
    got = rescale_noise_cfg(guided, cond, phi)
    for i in range(3):
        g, c = guided[i].numpy().astype(np.float64), cond[i].numpy().astype(np.float64)
        want = phi * g * (c.std(ddof=1) / g.std(ddof=1)) + (1 - phi) * g
        np.testing.assert_allclose(got[i].numpy(), want, rtol=1e-4, atol=1e-5)
    assert torch.allclose(got, diffusers_rescale(guided, cond, phi), atol=1e-5)
    assert torch.equal(rescale_noise_cfg(guided, cond, 0.0), guided)


def test_guidance_classes_branches_and_combine():
    g = CFG(7.5)
    assert g.branches(0, 0) == [UNCOND, POS0]
    assert g.branches(0, 1) == [Branch("neg", 0), POS0]  # negative prompt replaces the empty prompt
    assert CFG(1.0).branches(0, 0) == [POS0]
    with pytest.raises(ValueError, match="at most one negative"):
        g.branches(0, 2)
    with pytest.raises(ValueError, match="no extra positive"):
        g.branches(1, 0)
    u, c, n = (_rand(2, 4, 2, 2, seed=s) for s in (60, 61, 62))
    assert torch.allclose(g.combine({UNCOND: u, POS0: c}), cfg(u, c, 7.5))
    assert torch.allclose(g.combine({Branch("neg", 0): n, POS0: c}), cfg(n, c, 7.5))

    pn = PerpNeg(5.0, rescale=0.5)
    br = pn.branches(1, 2)
    assert br == [UNCOND, POS0, Branch("pos", 1), Branch("neg", 0), Branch("neg", 1)]
    preds = {b: _rand(2, 4, 2, 2, seed=70 + i) for i, b in enumerate(br)}
    a, w = torch.tensor([[0.3], [0.6]]), torch.tensor([[1.0, 2.0], [0.5, 0.0]])
    want = rescale_noise_cfg(
        perp_neg(preds[UNCOND], [preds[POS0], preds[br[2]]], [preds[br[3]], preds[br[4]]], 5.0, a, w), preds[POS0], 0.5
    )
    assert torch.allclose(pn.combine(preds, a, w), want, atol=1e-6)
    assert isinstance(make_guidance("perp_neg"), PerpNeg)
    assert isinstance(make_guidance("composable"), Composable)
    assert NPO.requires_negative_model and make_guidance("npo").name == "npo"
    with pytest.raises(ValueError, match="unknown guidance"):
        make_guidance("nope")


def test_guidance_is_computed_in_fp32_for_half_inputs():
    u, c, n = (_rand(1, 4, 8, 8, seed=s).half() for s in (80, 81, 82))
    out = perp_neg(u, [c], [n], 7.5)
    assert out.dtype == torch.float32
    want = perp_neg(u.float(), [c.float()], [n.float()], 7.5)
    assert torch.allclose(out, want)
