"""Robust DPO (Chowdhury et al., arXiv 2403.00409): Diffusion-DPO de-biased for labels flipped with
probability eps (TRL's `loss_type="robust"`, eps = `label_smoothing`, in [0, 0.5)):

    z    = -(beta / 2) ((err_w - err_l) - (ref_err_w - ref_err_l))        (as Diffusion-DPO)
    loss = mean([(1 - eps) (-log sigmoid(z)) - eps (-log sigmoid(-z))] / (1 - 2 eps))

It is an unbiased estimate of the clean-label DPO loss when a fraction eps of the pairs is flipped.
Method `robust_dpo` reads `label_smoothing` (must be > 0) and `beta_dpo`.
"""

from __future__ import annotations

import dataclasses

import torch

from diffusion_po.objectives import dpo
from diffusion_po.objectives.base import Batch, Method, Metrics, TrainContext, check_option, register_method
from diffusion_po.objectives.paired import paired_errors


def loss(
    err_w: torch.Tensor,
    err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    beta: float = 5000.0,
    epsilon: float = 0.1,
) -> tuple[torch.Tensor, Metrics]:
    """Label-flip de-biased Diffusion-DPO loss over 1-D per-sample errors (`dpo.loss` with label smoothing)."""
    if not 0.0 <= epsilon < 0.5:
        raise ValueError(f"epsilon must be in [0, 0.5), got {epsilon}")
    return dpo.loss(err_w, err_l, ref_err_w, ref_err_l, beta=beta, label_smoothing=epsilon)


@register_method
class RobustDPO(Method):
    """Diffusion-DPO with the robust (label-flip de-biased) loss; eps = `label_smoothing`."""

    name = "robust_dpo"

    @dataclasses.dataclass
    class Options(dpo.BetaOptions):
        label_smoothing: float = 0.0
        """eps, the label-flip rate (required, in (0, 0.5))."""

        def __post_init__(self) -> None:
            super().__post_init__()
            check_option(0.0 < self.label_smoothing < 0.5, "label_smoothing", "be in (0, 0.5) for method robust_dpo "
                         "(the label-flip rate eps)", self.label_smoothing)

    def compute_loss(self, ctx: TrainContext, batch: Batch):
        e = paired_errors(ctx, batch)
        o = self.options
        return loss(e["err_w"], e["err_l"], e["ref_err_w"], e["ref_err_l"], beta=o.beta_dpo,
                    epsilon=o.label_smoothing)
