"""Shared batch building for paired methods (DPO, NPO, DCPO, MaPO, ...): winner and loser share noise
and timestep, and run through the network in one batched forward."""

from __future__ import annotations

import torch

from diffusion_po.families import cat_cond
from diffusion_po.objectives.base import Batch, TrainContext
from diffusion_po.objectives.unpaired import denoising_errors


def paired_errors(
    ctx: TrainContext,
    batch: Batch,
    captions_w: list[str] | None = None,
    captions_l: list[str] | None = None,
    with_reference: bool = True,
) -> dict[str, torch.Tensor]:
    """Per-sample errors (fp32) of policy and reference on winner and loser.

    Winner and loser get the same t and the same noise (`ctx.training_noise`); the errors come from the shared
    `denoising_errors` (with `snr_gamma`, weighted alike for policy and reference). By default both are conditioned on the
    pair's prompt; DCPO passes each image's own caption. Returns err_w, err_l (with grad) and,
    with a reference, ref_err_w, ref_err_l.
    """
    x_w = ctx.latents(batch, "w")
    x_l = ctx.latents(batch, "l")
    n = x_w.shape[0]
    noise = ctx.training_noise(tuple(x_w.shape)).repeat(2, 1, 1, 1)
    t = ctx.timesteps(n).repeat(2)
    x0 = torch.cat([x_w, x_l])
    if captions_w is None and captions_l is None:
        cond = ctx.encode_prompts(batch["captions"], batch)
        cond = cat_cond([cond, cond])
    else:
        cond = cat_cond([ctx.encode_prompts(captions_w, batch), ctx.encode_prompts(captions_l, batch)])
    e = denoising_errors(ctx, x0, noise, t, cond, with_reference)
    out = {"err_w": e["err"][:n], "err_l": e["err"][n:]}
    if with_reference:
        out.update(ref_err_w=e["ref_err"][:n], ref_err_l=e["ref_err"][n:])
    return out
