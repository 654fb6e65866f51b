"""Diffusion-DPO plus an SFT regulariser on the winner (the diffusion analogue of RPO, Pang et al. 2024):

    loss = mean(-log sigmoid(z)) + alpha * mean(err_w)

z as in Diffusion-DPO; alpha = `sft_weight` (must be > 0); the same noise and t serve both terms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffusion_po.errors import ConfigError
from diffusion_po.objectives.base import Batch, Method, Metrics, TrainContext, register_method
from diffusion_po.objectives.dpo import implicit_reward_z
from diffusion_po.objectives.paired import paired_errors


def loss(
    err_w: torch.Tensor,
    err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    beta: float = 5000.0,
    sft_weight: float = 1.0,
) -> tuple[torch.Tensor, Metrics]:
    """Diffusion-DPO + sft_weight * mean(err_w), over 1-D per-sample errors."""
    z = implicit_reward_z(err_w, err_l, ref_err_w, ref_err_l, beta)
    dpo_term = -F.logsigmoid(z).mean()
    sft_term = err_w.float().mean()
    total = dpo_term + sft_weight * sft_term
    metrics = {
        "loss": total.detach(),
        "dpo_loss": dpo_term.detach(),
        "sft_loss": sft_term.detach(),
        "implicit_acc": ((z > 0).float().mean() + 0.5 * (z == 0).float().mean()).detach(),
        "reward_margin": z.mean().detach(),
    }
    return total, metrics


@register_method
class DPOSFT(Method):
    """Diffusion-DPO with an SFT term on the winners, weighted by `sft_weight`."""

    name = "dpo_sft"

    def __init__(self, config):
        super().__init__(config)
        if not config.sft_weight > 0:
            raise ConfigError("method dpo_sft needs sft_weight (the weight alpha of the SFT term) > 0")

    def compute_loss(self, ctx: TrainContext, batch: Batch):
        e = paired_errors(ctx, batch)
        cfg = self.config
        return loss(e["err_w"], e["err_l"], e["ref_err_w"], e["ref_err_l"], beta=cfg.beta_dpo,
                    sft_weight=cfg.sft_weight)
