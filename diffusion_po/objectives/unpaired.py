"""Shared batch building for methods that see images one at a time (SFT, KTO): each image gets its own
noise and timestep, and all images of the batch run through the network in one batched forward."""

from __future__ import annotations

import contextlib
from typing import Any

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


def autocast(ctx: Any):
    """The trainer's autocast context (`ctx.autocast()` or `ctx.accelerator.autocast()`), else a no-op."""
    if callable(getattr(ctx, "autocast", None)):
        return ctx.autocast()
    acc = getattr(ctx, "accelerator", None)
    if acc is not None:
        return acc.autocast()
    return contextlib.nullcontext()


def all_reduce_mean(ctx: Any, value: torch.Tensor) -> torch.Tensor:
    """Mean of a scalar over all processes (`ctx.all_reduce_mean`, else accelerate's reduce), no grad."""
    value = value.detach()
    if callable(getattr(ctx, "all_reduce_mean", None)):
        return ctx.all_reduce_mean(value)
    acc = getattr(ctx, "accelerator", None)
    if acc is not None and acc.num_processes > 1:
        return acc.reduce(value.reshape(1).to(acc.device), reduction="mean").reshape(())
    return value


def trainable_network(ctx: Any) -> torch.nn.Module:
    """The unwrapped network being trained (for snapshots and EMA teachers)."""
    net = getattr(ctx, "trainable_network", None)
    if net is None:
        raise RuntimeError("this method needs `ctx.trainable_network` from the trainer")
    return net
