"""Classifier-free guidance, with or without a negative prompt, and composable (weighted) negatives.

    cfg:         eps_hat = eps_base + s * (eps_pos - eps_base)
                 eps_base = eps(neg prompt) when a negative prompt is given (diffusers' negative-prompt
                 CFG: the negative replaces the empty prompt), else eps(empty prompt)
    composable:  eps_hat = eps_0 + s * [d_pos + sum_j a_j d_j - sum_k b_k d_neg_k],  d_i = eps_i - eps_0
                 (Liu et al. 2022, "Compositional visual generation"; Perp-Neg without the projections)
"""

from __future__ import annotations

from typing import ClassVar

import torch

from diffusion_po.guidance.base import POS0, UNCOND, Branch, Guidance, Predictions


def cfg(base: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """base + scale * (cond - base), in fp32. `base` is the unconditional or negative-prompt prediction."""
    base = base.float()
    return base + scale * (cond.float() - base)


def _weights(w: torch.Tensor | None, batch: int, n: int, like: torch.Tensor) -> torch.Tensor:
    """(B, n) weights as fp32 on `like`'s device; None means all ones."""
    if n == 0:
        return torch.zeros(batch, 0, device=like.device)
    if w is None:
        return torch.ones(batch, n, device=like.device)
    w = torch.as_tensor(w, dtype=torch.float32, device=like.device)
    if w.dim() == 1:
        w = w.unsqueeze(0).expand(batch, -1)
    if tuple(w.shape) != (batch, n):
        raise ValueError(f"expected weights of shape ({batch}, {n}), got {tuple(w.shape)}")
    return w


def _col(w: torch.Tensor, j: int, like: torch.Tensor) -> torch.Tensor:
    """Column j of (B, n) weights, shaped to broadcast against `like` (B, C, H, W)."""
    return w[:, j].view((-1,) + (1,) * (like.dim() - 1))


def composable(
    uncond: torch.Tensor,
    pos: list[torch.Tensor],
    neg: list[torch.Tensor],
    scale: float,
    pos_weights: torch.Tensor | None = None,
    neg_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """eps_0 + s * [d_pos + sum_j a_j d_j - sum_k b_k d_neg_k]; pos[0] is the main prompt (weight 1)."""
    e0 = uncond.float()
    b = e0.shape[0]
    a = _weights(pos_weights, b, len(pos) - 1, e0)
    bw = _weights(neg_weights, b, len(neg), e0)
    total = pos[0].float() - e0
    for j, p in enumerate(pos[1:]):
        total = total + _col(a, j, e0) * (p.float() - e0)
    for k, n in enumerate(neg):
        total = total - _col(bw, k, e0) * (n.float() - e0)
    return e0 + scale * total


class CFG(Guidance):
    """Plain CFG; with one negative prompt, diffusers' negative-prompt CFG (the negative replaces "").

    With a negative (NPO) model attached to the sampler this is NPO guidance: the base branch is then
    computed by the negative model. Scale 1 skips the base branch (the result would be eps_pos).
    """

    name: ClassVar[str] = "cfg"

    def branches(self, n_extra_pos: int, n_neg: int) -> list[Branch]:
        if n_extra_pos:
            raise ValueError(
                f"'{self.name}' guidance takes no extra positive prompts; use 'composable' or 'perp-neg'"
            )
        if n_neg > 1:
            raise ValueError(
                f"'{self.name}' guidance takes at most one negative prompt (it replaces the empty prompt); "
                "for several weighted negatives use 'perp-neg' or 'composable'"
            )
        if self.scale == 1.0:
            return [POS0]
        return [Branch("neg", 0) if n_neg else UNCOND, POS0]

    def combine(self, preds: Predictions, pos_weights=None, neg_weights=None) -> torch.Tensor:
        if self.scale == 1.0 and len(preds) == 1:
            return preds[POS0].float()
        base = preds.get(Branch("neg", 0), preds.get(UNCOND))
        if base is None:
            raise KeyError("CFG needs the 'uncond' or 'neg0' branch")
        return self._finish(cfg(base, preds[POS0], self.scale), preds)


class Composable(Guidance):
    """Weighted positives and negatives as plain differences from the unconditional prediction."""

    name: ClassVar[str] = "composable"

    def branches(self, n_extra_pos: int, n_neg: int) -> list[Branch]:
        return (
            [UNCOND, POS0]
            + [Branch("pos", j) for j in range(1, n_extra_pos + 1)]
            + [Branch("neg", k) for k in range(n_neg)]
        )

    @staticmethod
    def _split(preds: Predictions) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        pos = [preds[b] for b in sorted((b for b in preds if b.kind == "pos"), key=lambda b: b.index)]
        neg = [preds[b] for b in sorted((b for b in preds if b.kind == "neg"), key=lambda b: b.index)]
        return preds[UNCOND], pos, neg

    def combine(self, preds: Predictions, pos_weights=None, neg_weights=None) -> torch.Tensor:
        e0, pos, neg = self._split(preds)
        return self._finish(composable(e0, pos, neg, self.scale, pos_weights, neg_weights), preds)
