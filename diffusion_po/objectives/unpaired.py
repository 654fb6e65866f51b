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
    noise = ctx.training_noise(tuple(x0.shape))
    t = ctx.timesteps(x0.shape[0])
    return denoising_errors(ctx, x0, noise, t, cond, with_reference)


def denoising_errors(
    ctx: TrainContext,
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    cond: Conditioning,
    with_reference: bool = True,
) -> dict[str, torch.Tensor]:
    """The shared per-sample error path of paired and unpaired methods: x_t and the target from (x0, noise, t),
    then `err` of the policy (with grad) and `ref_err` of the reference, both fp32 and both multiplied by the
    same `ctx.error_weights(t)` (min-SNR-gamma) when the run sets them.

    Weighing the two alike keeps DPO's implicit reward a difference of weighted errors,
    z = -(beta/2) w(t) [(err_w - err_l) - (ref_err_w - ref_err_l)]: a per-timestep rescaling of beta, zero
    when policy equals reference (loss log 2 at the start), as the min-SNR weighting of the diffusers DPO loss.
    """
    family = ctx.family
    x_t = family.noisy_latents(x0, noise, t)
    target = family.training_target(x0, noise, t)
    weights = ctx.error_weights(t)
    out = {"err": per_sample_error(ctx.policy_predict(x_t, t, cond), target)}
    if with_reference:
        out["ref_err"] = per_sample_error(ctx.reference_predict(x_t, t, cond), target)
    if weights is not None:
        out = {k: v * weights for k, v in out.items()}
    return out


def autocast(ctx: TrainContext):
    """The run's mixed-precision context (`ctx.autocast()`), for teacher and snapshot forwards."""
    return ctx.autocast()


def trainable_network(ctx: TrainContext) -> torch.nn.Module:
    """The unwrapped network being trained (`ctx.trainable_network`), for snapshots and EMA teachers."""
    return ctx.trainable_network
