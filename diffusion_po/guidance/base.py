"""The guidance contract: a method names the branch predictions it needs and combines them.

A *branch* is one network evaluation per image at the current step: the unconditional prompt
(`uncond`), the main or an extra positive prompt (`pos`, index 0 is the main prompt), or a negative
prompt (`neg`). Which weights compute a branch (the positive model, or an NPO negative model) is the
sampler's business, not the formula's: the same `combine` serves plain CFG and NPO guidance.

Every `combine` is a pure function of the branch tensors (fp32 inside, any prediction space: epsilon,
v or flow velocity, since all methods are linear combinations plus per-sample projections).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

BranchKind = Literal["uncond", "pos", "neg"]


@dataclass(frozen=True)
class Branch:
    """One branch prediction: `kind` and, for `pos`/`neg`, which prompt (pos 0 = the main prompt)."""

    kind: BranchKind
    index: int = 0

    def __str__(self) -> str:
        return self.kind if self.kind == "uncond" else f"{self.kind}{self.index}"


UNCOND = Branch("uncond")
POS0 = Branch("pos", 0)

Predictions = dict[Branch, torch.Tensor]


def per_sample_dot(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """<u, v> per sample, summed over every dim but the batch; shape (B, 1, ..., 1), fp32."""
    dims = tuple(range(1, u.dim()))
    return (u.float() * v.float()).sum(dim=dims, keepdim=True)


def rescale_noise_cfg(guided: torch.Tensor, cond: torch.Tensor, guidance_rescale: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2023, "Common diffusion noise schedules ...", eq. 15-16).

    x_rescaled = guided * std(cond) / std(guided)   (std per sample over C,H,W)
    out        = phi * x_rescaled + (1 - phi) * guided
    """
    if guidance_rescale <= 0:
        return guided
    dims = tuple(range(1, guided.dim()))
    std_cond = cond.float().std(dim=dims, keepdim=True)
    std_guided = guided.float().std(dim=dims, keepdim=True)
    rescaled = guided.float() * (std_cond / std_guided)
    return guidance_rescale * rescaled + (1.0 - guidance_rescale) * guided.float()


class Guidance:
    """Base class. Subclasses set `name`, implement `branches` and `combine`.

    Attributes: `scale` (s), `rescale` (phi of Lin et al., 0 = off).
    """

    name: ClassVar[str] = ""
    #: True when the method only makes sense with a negative (NPO) model attached
    requires_negative_model: ClassVar[bool] = False

    def __init__(self, scale: float = 7.5, rescale: float = 0.0):
        if not 0.0 <= rescale <= 1.0:
            raise ValueError(f"guidance rescale must be in [0, 1], got {rescale}")
        self.scale = float(scale)
        self.rescale = float(rescale)

    def branches(self, n_extra_pos: int, n_neg: int) -> list[Branch]:
        """The branches needed for items with `n_extra_pos` extra positives and `n_neg` negatives."""
        raise NotImplementedError

    def combine(
        self,
        preds: Predictions,
        pos_weights: torch.Tensor | None = None,
        neg_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Guided prediction (fp32) from the branch predictions.

        `pos_weights`: (B, P) weights a_j of the extra positives; `neg_weights`: (B, K) weights b_k >= 0
        of the negatives (per image, so a batch may mix weights).
        """
        raise NotImplementedError

    def _finish(self, guided: torch.Tensor, preds: Predictions) -> torch.Tensor:
        return rescale_noise_cfg(guided, preds[POS0], self.rescale) if self.rescale > 0 else guided

    def describe(self) -> dict:
        """Settings for metadata and manifests."""
        return {"guidance": self.name, "guidance_scale": self.scale, "guidance_rescale": self.rescale}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(scale={self.scale}, rescale={self.rescale})"
