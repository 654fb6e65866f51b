"""DCPO, Dual Caption Preference Optimization (Saeidi, Luo et al., arXiv 2502.06023).

Diffusion-DPO where the preferred image is conditioned on its own caption z_w and the rejected image on
its own caption z_l, for the policy and the reference alike; t and noise are shared within the pair:

    model_diff = err(x_w | z_w) - err(x_l | z_l)        ref_diff likewise with the reference
    z          = -(beta / 2) (model_diff - ref_diff)     loss = mean(-log sigmoid(z))

`beta_dpo` is in the same convention as the DCPO repository (its run.sh uses 500, kappa = 250).

Data: `data.format: dcpo` (Pick-a-Pic columns plus `caption_0`/`caption_1`, the Pick-Double-Caption
layout, where caption_k describes jpg_k); `diffusion-po data captions` makes such a file.

Fixes over the reference: the training target follows the model's prediction type (the reference forces
epsilon, wrong for SD2.1-v); SDXL gets the per-image captions through both text encoders (the reference
falls back to the shared caption there, i.e. plain DPO).
"""

from __future__ import annotations

import dataclasses

import torch

from diffusion_po.errors import DataError
from diffusion_po.objectives import dpo
from diffusion_po.objectives.base import Batch, Method, Metrics, TrainContext, register_method
from diffusion_po.objectives.paired import paired_errors


def loss(
    err_w: torch.Tensor,
    err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    beta: float = 500.0,
) -> tuple[torch.Tensor, Metrics]:
    """DCPO loss over per-sample errors computed with per-image captions; the DPO formula."""
    return dpo.loss(err_w, err_l, ref_err_w, ref_err_l, beta=beta)


@register_method
class DCPO(Method):
    """Diffusion-DPO with the winner and the loser each conditioned on its own caption."""

    name = "dcpo"
    data_formats = ("dcpo",)

    @dataclasses.dataclass
    class Options(dpo.BetaOptions):
        pass

    def compute_loss(self, ctx: TrainContext, batch: Batch):
        if "captions_w" not in batch or "captions_l" not in batch:
            if "prompt_cond" in batch:
                raise DataError(
                    "method dcpo needs one caption per image, but this data cache holds one prompt "
                    "embedding per pair; train from the dcpo-format files (data.format: dcpo) instead"
                )
            raise DataError("method dcpo needs per-image captions (data.format: dcpo, columns caption_0/caption_1)")
        e = paired_errors(ctx, batch, batch["captions_w"], batch["captions_l"])
        return loss(e["err_w"], e["err_l"], e["ref_err_w"], e["ref_err_l"], beta=self.options.beta_dpo)
