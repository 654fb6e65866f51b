"""Diffusion-NPO (Wang et al., ICLR 2025): train a *negative-preference* model with Diffusion-DPO on
reversed preferences; at inference it replaces the unconditional branch of CFG.

The loss is exactly Diffusion-DPO's (`diffusion_po.objectives.dpo.loss`) with winner and loser swapped
(the data loader does the swap: method `npo` turns `data.reverse_labels` on). The metrics
(`implicit_acc`, `reward_margin`) are therefore measured against the *reversed* labels.

beta conventions: `beta_dpo` here has the 1/2 of the original Diffusion-DPO repository,
z = -(beta/2) (model_diff - ref_diff). The NPO-SD1.5 launcher (diffusers SD1.5 script, no 1/2) uses
beta 500, which is `beta_dpo: 1000` here; the NPO-SDXL launcher (with the 1/2) uses beta 2000, which is
`beta_dpo: 2000` here. Both give an effective multiplier kappa = beta_dpo / 2 of 500 and 1000.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from diffusion_po.objectives import dpo
from diffusion_po.objectives.base import Batch, Method, Metrics, TrainContext, register_method
from diffusion_po.objectives.paired import paired_errors

if TYPE_CHECKING:
    from diffusion_po.config import TrainConfig


def beta_from_reference(beta: float, has_half: bool) -> float:
    """`beta_dpo` (this framework's convention, with the 1/2) equal to a reference script's beta.

    The diffusers SD1.5 DPO/NPO scripts have no 1/2 (`has_half=False`): their beta 500 is 1000 here.
    """
    return float(beta) if has_half else 2.0 * float(beta)


def loss(
    err_w: torch.Tensor,
    err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    beta: float = 1000.0,
) -> tuple[torch.Tensor, Metrics]:
    """NPO loss given errors already in *reversed* order (err_w is the human-rejected image).

    Identical to Diffusion-DPO's loss; kept as its own name so a reader finds the method here.
    """
    return dpo.loss(err_w, err_l, ref_err_w, ref_err_l, beta=beta)


@register_method
class DiffusionNPO(Method):
    """DPO on reversed preferences: trains the negative model used by NPO guidance."""

    name = "npo"

    @dataclasses.dataclass
    class Options(dpo.BetaOptions):
        pass

    def __init__(self, config: TrainConfig):
        super().__init__(config)
        # The data loader swaps winner and loser; the resolved config saved with the run shows it.
        config.data.reverse_labels = True

    def compute_loss(self, ctx: TrainContext, batch: Batch):
        e = paired_errors(ctx, batch)
        return loss(e["err_w"], e["err_l"], e["ref_err_w"], e["ref_err_l"], beta=self.options.beta_dpo)
