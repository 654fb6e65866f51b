"""MaPO, margin-aware preference optimisation (Hong, Paul et al., arXiv 2406.06424); reference-free.

With s = `snr_value` (0.5) and T the number of training timesteps (1000):

    r(e)     = s e / (exp(s e) - 1)                       (r(0) = 1, its limit)
    log_odds = r(err_w) - r(err_l)
    loss     = mean(err_w) - beta_mapo * mean(log sigmoid(T * log_odds))

The first term is SFT on the winner; noise and t are shared within the pair. beta_mapo = 0.1.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from diffusion_po.objectives.base import Batch, Method, Metrics, TrainContext, register_method
from diffusion_po.objectives.paired import paired_errors


def _x_over_expm1(x: torch.Tensor) -> torch.Tensor:
    """x / (e^x - 1), equal to 1 at x = 0 (the reference divides 0 by 0 there)."""
    small = x.abs() < 1e-6
    safe = torch.where(small, torch.ones_like(x), x)
    return torch.where(small, 1.0 - x / 2, safe / torch.expm1(safe))


def loss(
    err_w: torch.Tensor,
    err_l: torch.Tensor,
    beta: float = 0.1,
    snr_value: float = 0.5,
    num_train_timesteps: int = 1000,
) -> tuple[torch.Tensor, Metrics]:
    """MaPO loss over 1-D per-sample errors of winner and loser (no reference)."""
    ew, el = err_w.float(), err_l.float()
    log_odds = _x_over_expm1(snr_value * ew) - _x_over_expm1(snr_value * el)
    ratio = F.logsigmoid(log_odds * num_train_timesteps)
    sft = ew.mean()
    total = sft - beta * ratio.mean()
    metrics = {
        "loss": total.detach(),
        "sft_loss": sft.detach(),
        "ratio_loss": (-beta * ratio).mean().detach(),
        "log_odds": log_odds.mean().detach(),
        "implicit_acc": (log_odds > 0).float().mean().detach(),
        "model_loss_w": ew.mean().detach(),
        "model_loss_l": el.mean().detach(),
    }
    return total, metrics


@register_method
class MaPO(Method):
    """Reference-free, margin-aware: likelihood margin between winner and loser plus SFT on the winner."""

    name = "mapo"
    needs_reference = False

    @dataclasses.dataclass
    class Options:
        beta_mapo: float = 0.1
        snr_value: float = 0.5

    def compute_loss(self, ctx: TrainContext, batch: Batch):
        e = paired_errors(ctx, batch, with_reference=False)
        o = self.options
        return loss(e["err_w"], e["err_l"], beta=o.beta_mapo, snr_value=o.snr_value,
                    num_train_timesteps=ctx.family.num_train_timesteps)
