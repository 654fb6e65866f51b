"""Diffusion-DPO (Wallace et al., CVPR 2024), exactly as the original repository computes it.

    model_diff = err_w - err_l                 (policy, per pair)
    ref_diff   = ref_err_w - ref_err_l         (reference, no grad)
    z          = -(beta / 2) * (model_diff - ref_diff)
    loss       = mean(-log sigmoid(z))

`beta` is in the original repository's convention (default 5000). The effective multiplier on the
bracket is kappa = beta / 2 = 2500. The diffusers SD1.5 LoRA example has no 1/2: its beta 2500 equals
beta_dpo 5000 here; its SDXL example matches this convention. NPO-SD1.5's beta 500 (no 1/2) is 1000 here.

Options (`method_options`, or the top-level spellings of the diffusers scripts): `beta_dpo`; `sft_weight`
adds alpha * mean(err_w) (DPO+SFT, "RPO"); `label_smoothing` eps > 0 gives the robust (label-flip
de-biased, Chowdhury et al.) form
    [(1 - eps) * -log sigmoid(z) - eps * -log sigmoid(-z)] / (1 - 2 eps).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from diffusion_po.objectives.base import Batch, Method, Metrics, TrainContext, check_option, register_method
from diffusion_po.objectives.paired import paired_errors


@dataclasses.dataclass
class BetaOptions:
    """The setting every method on the DPO implicit reward has (dpo, npo, dcpo, robust_dpo, dpo_sft)."""

    beta_dpo: float = 5000.0
    """DPO beta in the original repository's convention: z = -(beta/2) * (model_diff - ref_diff)."""

    def __post_init__(self) -> None:
        check_option(self.beta_dpo > 0, "beta_dpo", "be positive", self.beta_dpo)


def implicit_reward_z(err_w, err_l, ref_err_w, ref_err_l, beta: float) -> torch.Tensor:
    """z = -(beta/2) * ((err_w - err_l) - (ref_err_w - ref_err_l)), per pair, fp32."""
    model_diff = err_w.float() - err_l.float()
    ref_diff = ref_err_w.float() - ref_err_l.float()
    return -0.5 * beta * (model_diff - ref_diff)


def loss(
    err_w: torch.Tensor,
    err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    beta: float = 5000.0,
    sft_weight: float = 0.0,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, Metrics]:
    """Diffusion-DPO loss over 1-D per-sample errors. Returns (scalar loss, metrics)."""
    z = implicit_reward_z(err_w, err_l, ref_err_w, ref_err_l, beta)
    nll = -F.logsigmoid(z)
    if label_smoothing > 0:
        eps = label_smoothing
        per_pair = ((1 - eps) * nll - eps * -F.logsigmoid(-z)) / (1 - 2 * eps)
    else:
        per_pair = nll
    total = per_pair.mean()
    dpo_term = total
    if sft_weight:
        sft_term = err_w.float().mean()
        total = total + sft_weight * sft_term
    metrics = {
        "loss": total.detach(),
        "dpo_loss": dpo_term.detach(),
        "implicit_acc": ((z > 0).float().mean() + 0.5 * (z == 0).float().mean()).detach(),
        "reward_margin": z.mean().detach(),
        "model_diff": (err_w - err_l).float().mean().detach(),
        "ref_diff": (ref_err_w - ref_err_l).float().mean().detach(),
        "raw_model_loss": (0.5 * (err_w.float().mean() + err_l.float().mean())).detach(),
        "ref_loss": (0.5 * (ref_err_w.float().mean() + ref_err_l.float().mean())).detach(),
    }
    metrics.update(trl_reward_metrics(err_w, err_l, ref_err_w, ref_err_l, beta, z))
    if sft_weight:
        metrics["sft_loss"] = sft_term.detach()
    return total, metrics


def trl_reward_metrics(err_w, err_l, ref_err_w, ref_err_l, beta: float, z: torch.Tensor) -> Metrics:
    """TRL's DPO metric names for the implicit rewards r = -(beta/2)(err - ref_err) of winner and loser
    (their difference is z): `rewards/chosen`, `rewards/rejected`, `rewards/margins` (= reward_margin) and
    `rewards/accuracies` (the share of pairs with z > 0; ties count 0, as in TRL)."""
    chosen = -0.5 * beta * (err_w.float() - ref_err_w.float())
    rejected = -0.5 * beta * (err_l.float() - ref_err_l.float())
    return {
        "rewards/chosen": chosen.mean().detach(),
        "rewards/rejected": rejected.mean().detach(),
        "rewards/margins": z.mean().detach(),
        "rewards/accuracies": (z > 0).float().mean().detach(),
    }


@register_method
class DiffusionDPO(Method):
    """Pairs from a preference data set; options beta_dpo, sft_weight and label_smoothing."""

    name = "dpo"

    @dataclasses.dataclass
    class Options(BetaOptions):
        sft_weight: float = 0.0
        """alpha of the SFT term alpha * mean(err_w) (0: none)."""
        label_smoothing: float = 0.0
        """eps of the robust (label-flip de-biased) form, in [0, 0.5) (0: plain DPO)."""

        def __post_init__(self) -> None:
            super().__post_init__()
            check_option(self.sft_weight >= 0, "sft_weight", "be >= 0", self.sft_weight)
            check_option(0.0 <= self.label_smoothing < 0.5, "label_smoothing", "be in [0, 0.5)", self.label_smoothing)

    def compute_loss(self, ctx: TrainContext, batch: Batch):
        e = paired_errors(ctx, batch)
        o = self.options
        return loss(
            e["err_w"], e["err_l"], e["ref_err_w"], e["ref_err_l"],
            beta=o.beta_dpo, sft_weight=o.sft_weight, label_smoothing=o.label_smoothing,
        )
