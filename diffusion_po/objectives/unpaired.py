"""Shared batch building for methods that see images one at a time (SFT, KTO): each image gets its own
noise and timestep, and all images of the batch run through the network in one batched forward."""

from __future__ import annotations

import torch

from diffusion_po.families import Conditioning, per_sample_error
from diffusion_po.objectives.base import TrainContext


def image_errors(
    ctx: TrainContext,
    x0: torch.Tensor,
    cond: Conditioning,
    with_reference: bool = True,
) -> dict[str, torch.Tensor]:
    """Per-sample errors (fp32) of policy and reference on latents `x0` with independent noise and t.

    Returns `err` (with grad) and, with a reference, `ref_err`.
    """
    n = x0.shape[0]
    noise = ctx.randn(tuple(x0.shape))
    t = ctx.timesteps(n)
    family = ctx.family
    x_t = family.noisy_latents(x0, noise, t)
    target = family.training_target(x0, noise, t)
    out = {"err": per_sample_error(ctx.policy_predict(x_t, t, cond), target)}
    if with_reference:
        out["ref_err"] = per_sample_error(ctx.reference_predict(x_t, t, cond), target)
    return out


def autocast(ctx: TrainContext):
    """The run's mixed-precision context (`ctx.autocast()`), for teacher and snapshot forwards."""
    return ctx.autocast()


def trainable_network(ctx: TrainContext) -> torch.nn.Module:
    """The unwrapped network being trained (`ctx.trainable_network`), for snapshots and EMA teachers."""
    return ctx.trainable_network
