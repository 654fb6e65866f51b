"""Supervised fine-tuning on preferred images ("SFT-chosen"); no reference model.

    loss = sum_i w_i err_i / sum_i w_i

On pairs only the winners are used (w = 1), each with its own noise and timestep; on `images` data every
image counts, or only those labelled 1 when the data has labels. With equal weights this is the plain
diffusion loss, the reference's `F.mse_loss(pred, noise)` on the winners.
"""

from __future__ import annotations

import torch

from diffusion_po.errors import DataError
from diffusion_po.objectives.base import Batch, Method, Metrics, TrainContext, register_method
from diffusion_po.objectives.unpaired import image_errors


def loss(err: torch.Tensor, weights: torch.Tensor | None = None) -> tuple[torch.Tensor, Metrics]:
    """Weighted mean of 1-D per-sample errors (plain mean without weights)."""
    err = err.float()
    if weights is None:
        total = err.mean()
    else:
        w = weights.float().to(err.device)
        if float(w.sum()) <= 0:
            total = err.sum() * 0.0  # nothing to learn from in this batch; keeps the graph
        else:
            total = (w * err).sum() / w.sum()
    return total, {"loss": total.detach(), "raw_model_loss": err.mean().detach()}


@register_method
class SFT(Method):
    """Diffusion loss on the preferred image of each pair (or on desirable images)."""

    name = "sft"
    data_formats = ("pickapic", "pairs", "dcpo", "images")
    needs_reference = False

    def compute_loss(self, ctx: TrainContext, batch: Batch):
        if ctx.has_images(batch, "w"):
            x0 = ctx.latents(batch, "w")
            captions = batch.get("captions_w") or batch["captions"]
            weights = None
        elif ctx.has_images(batch, ""):
            x0 = ctx.latents(batch, "")
            captions = batch["captions"]
            weights = batch["labels"].float() if "labels" in batch else None
        else:
            raise DataError("method sft needs images: a paired format (winners) or data.format images")
        e = image_errors(ctx, x0, ctx.encode_prompts(captions, batch), with_reference=False)
        return loss(e["err"], weights)
