"""Diffusion-KTO (Li et al., NeurIPS 2024): unpaired images labelled desirable (1) or undesirable (0).

Per image, with its own noise and timestep:

    g   = err_ref - err_theta                          (implicit reward)
    z0  = max(0, mean over the batch (all processes) of g), detached   (reference point)
    h   = sigmoid(s_y * beta * (g - z0)),  s_y = +1 desirable, -1 undesirable
    loss = mean(lambda_y * (1 - h))                    (the "sigmoid" halo of the reference)

beta (`method_options.beta`, default 1000 as the reference's `beta_dpo`) multiplies g directly (no 1/2).
Data: `data.format: images` with a label column (`data.label_column`, default `label`), or any paired
format, whose winners count as desirable and losers as undesirable (each image gets its own noise).
"""

from __future__ import annotations

import dataclasses

import torch

from diffusion_po.errors import DataError
from diffusion_po.objectives.base import Batch, Method, Metrics, TrainContext, register_method
from diffusion_po.objectives.unpaired import image_errors


def loss(
    err: torch.Tensor,
    ref_err: torch.Tensor,
    labels: torch.Tensor,
    beta: float = 1000.0,
    lambda_d: float = 1.0,
    lambda_u: float = 1.0,
    reference_point: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """KTO loss over 1-D per-image errors and labels (1 desirable, 0 undesirable).

    `reference_point` is the batch mean of g over all processes (default: this batch's); it is clamped at
    0 and detached here.
    """
    g = ref_err.float() - err.float()
    z0 = g.mean() if reference_point is None else reference_point.float().to(g.device)
    z0 = z0.detach().clamp(min=0)
    desirable = labels.to(g.device) > 0.5
    sign = desirable.float() * 2 - 1
    inner = sign * beta * (g - z0)
    h = torch.sigmoid(inner)
    weight = torch.where(desirable, torch.full_like(g, lambda_d), torch.full_like(g, lambda_u))
    total = (weight * (1 - h)).mean()
    n_pos = desirable.sum()
    n_neg = (~desirable).sum()
    metrics = {
        "loss": total.detach(),
        "reference_point": z0.detach(),
        "implicit_acc": (inner > 0).float().mean().detach(),
        "reward_desirable": (g[desirable].sum() / n_pos.clamp(min=1)).detach(),
        "reward_undesirable": (g[~desirable].sum() / n_neg.clamp(min=1)).detach(),
        "n_desirable": n_pos.float().detach(),
        "raw_model_loss": err.float().mean().detach(),
        "ref_loss": ref_err.float().mean().detach(),
    }
    return total, metrics


@register_method
class DiffusionKTO(Method):
    """KTO on labelled images (or on the winners and losers of pairs)."""

    name = "kto"
    data_formats = ("images", "pickapic", "pairs", "dcpo")

    @dataclasses.dataclass
    class Options:
        beta: float = 1000.0
        lambda_d: float = 1.0
        """Weight of desirable images."""
        lambda_u: float = 1.0
        """Weight of undesirable images."""

    def compute_loss(self, ctx: TrainContext, batch: Batch):
        if ctx.has_images(batch, "w"):
            x0 = torch.cat([ctx.latents(batch, "w"), ctx.latents(batch, "l")])
            n = x0.shape[0] // 2
            labels = torch.cat([torch.ones(n), torch.zeros(n)])
            c = ctx.encode_prompts(batch["captions"], batch)
            cond = {k: torch.cat([v, v]) for k, v in c.items()}
        else:
            if "labels" not in batch:
                raise DataError(
                    "method kto needs a label per image: add a 0/1 column (data.label_column) to the images data, "
                    "or train from pairs (winners desirable, losers undesirable)"
                )
            x0 = ctx.latents(batch, "")
            labels = batch["labels"].float()
            cond = ctx.encode_prompts(batch["captions"], batch)
        e = image_errors(ctx, x0, cond)
        g_mean = (e["ref_err"].float() - e["err"].float()).mean()
        o = self.options
        return loss(e["err"], e["ref_err"], labels, beta=o.beta, lambda_d=o.lambda_d, lambda_u=o.lambda_u,
                    reference_point=ctx.all_reduce_mean(g_mean))
