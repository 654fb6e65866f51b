"""Diffusion-DPO plus an SFT regulariser on the winner (the diffusion analogue of RPO, Pang et al. 2024):

    loss = mean(-log sigmoid(z)) + alpha * mean(err_w)

z as in Diffusion-DPO; alpha = `sft_weight` (must be > 0); the same noise and t serve both terms.
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
    sft_weight: float = 1.0,
) -> tuple[torch.Tensor, Metrics]:
    """Diffusion-DPO + sft_weight * mean(err_w), over 1-D per-sample errors (`dpo.loss` with an SFT term)."""
    return dpo.loss(err_w, err_l, ref_err_w, ref_err_l, beta=beta, sft_weight=sft_weight)


@register_method
class DPOSFT(Method):
    """Diffusion-DPO with an SFT term on the winners, weighted by `sft_weight`."""

    name = "dpo_sft"

    @dataclasses.dataclass
    class Options(dpo.BetaOptions):
        sft_weight: float = 0.0
        """alpha, the weight of the SFT term (required, > 0)."""

        def __post_init__(self) -> None:
            super().__post_init__()
            check_option(self.sft_weight > 0, "sft_weight", "be > 0 for method dpo_sft (the weight alpha of the "
                         "SFT term)", self.sft_weight)

    def compute_loss(self, ctx: TrainContext, batch: Batch):
        e = paired_errors(ctx, batch)
        o = self.options
        return loss(e["err_w"], e["err_l"], e["ref_err_w"], e["ref_err_l"], beta=o.beta_dpo, sft_weight=o.sft_weight)
