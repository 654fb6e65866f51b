"""Perp-Neg (Armandpour et al. 2023, "Re-imagine the negative prompt algorithm", arXiv 2304.04968).

    d_i     = eps_i - eps_0                       (eps_0: empty prompt)
    perp(u, v) = u - (<u, v> / ||v||^2) v         (per sample, over C,H,W)
    eps_hat = eps_0 + s * [ d_pos + sum_j a_j perp(d_j, d_pos) - sum_k b_k perp(d_neg_k, d_pos) ]

Only the part of a negative direction orthogonal to the main positive direction is removed, so a
negative that overlaps the main prompt cannot erase what the main prompt asks for.

Fixes relative to the reference SD pipeline (`pipeline_perpneg_stable_diffusion.py`):
- projections are per sample (the reference sums <u, v> over the whole batch);
- extra positive j uses its own weight a_j (the reference is off by one and gives it the previous
  prompt's weight, ignoring the main prompt's);
- a zero-norm d_pos is guarded: with nothing to project on, perp(u, 0) = u (the reference divides by 0);
- negative weights b_k are given positive (the reference takes |w| of "-1.5"-style strings).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from diffusion_po.guidance.base import per_sample_dot
from diffusion_po.guidance.cfg import Composable, _col, _weights

#: below this squared norm (fp32, summed over C,H,W) d_pos counts as zero and nothing is projected out
ZERO_NORM_EPS = 1e-12


def perp(u: torch.Tensor, v: torch.Tensor, eps: float = ZERO_NORM_EPS) -> torch.Tensor:
    """Component of `u` orthogonal to `v`, per sample: u - (<u,v>/||v||^2) v; u itself where ||v||^2 <= eps."""
    uf, vf = u.float(), v.float()
    vv = per_sample_dot(vf, vf)
    coef = torch.where(vv > eps, per_sample_dot(uf, vf) / vv.clamp_min(eps), torch.zeros_like(vv))
    return uf - coef * vf


def perp_neg(
    uncond: torch.Tensor,
    pos: list[torch.Tensor],
    neg: list[torch.Tensor],
    scale: float,
    pos_weights: torch.Tensor | None = None,
    neg_weights: torch.Tensor | None = None,
    eps: float = ZERO_NORM_EPS,
) -> torch.Tensor:
    """Perp-Neg guided prediction (fp32).

    uncond: eps_0; pos: [eps_main, eps_extra_1, ...]; neg: [eps_neg_1, ...];
    pos_weights (B, len(pos) - 1) = a_j of the extra positives; neg_weights (B, len(neg)) = b_k >= 0.
    The main prompt's weight is 1. Weights given as a 1-D tensor apply to every sample.
    """
    if not pos:
        raise ValueError("perp_neg needs the main positive prediction")
    e0 = uncond.float()
    b = e0.shape[0]
    a = _weights(pos_weights, b, len(pos) - 1, e0)
    bw = _weights(neg_weights, b, len(neg), e0)
    d_pos = pos[0].float() - e0
    total = d_pos.clone()
    for j, p in enumerate(pos[1:]):
        total = total + _col(a, j, e0) * perp(p.float() - e0, d_pos, eps)
    for k, n in enumerate(neg):
        total = total - _col(bw, k, e0) * perp(n.float() - e0, d_pos, eps)
    return e0 + scale * total


class PerpNeg(Composable):
    """Perp-Neg guidance. Branches: empty prompt, main prompt, extra positives, negatives.

    Default scale 7.5 as the reference CLI; the reference README's "1|-1.5" is `neg_weights=[1.5]`.
    With a negative (NPO) model attached, eps_0 and the negatives come from the negative model.
    """

    name: ClassVar[str] = "perp-neg"

    def __init__(self, scale: float = 7.5, rescale: float = 0.0, eps: float = ZERO_NORM_EPS):
        super().__init__(scale, rescale)
        self.eps = eps

    def combine(self, preds, pos_weights=None, neg_weights=None) -> torch.Tensor:
        e0, pos, neg = self._split(preds)
        return self._finish(perp_neg(e0, pos, neg, self.scale, pos_weights, neg_weights, self.eps), preds)
