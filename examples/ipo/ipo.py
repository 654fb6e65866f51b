"""IPO (Azar et al., "A General Theoretical Paradigm to Understand Learning from Human Preferences",
AISTATS 2024, arXiv 2310.12036, eq. 17) on the Diffusion-DPO implicit reward: a complete method in one file.

IPO regresses the log-likelihood-ratio margin h of a pair to 1/(2 tau) instead of pushing it to infinity
as DPO's -log sigmoid does (TRL: `loss_type="ipo"`, losses = (logits - 1/(2 beta))^2):

    loss = mean((h - 1 / (2 tau))^2)

For a diffusion model h is Diffusion-DPO's (Wallace et al., CVPR 2024) stand-in for the log-ratio, the
error bracket scaled by beta_dpo / 2 (which plays the part of T * omega(lambda_t) in their bound):

    h = -(beta_dpo / 2) * ((err_w - err_l) - (ref_err_w - ref_err_l))

i.e. z of `diffusion_po.objectives.dpo.implicit_reward_z`. Use it with `method: ipo:IPO` and this folder on
the Python path (`PYTHONPATH=examples/ipo diffusion-po train examples/ipo/ipo.yaml`).
"""

from __future__ import annotations

import dataclasses

import torch

from diffusion_po.objectives import Method, TrainContext
from diffusion_po.objectives.base import Batch, Metrics, check_option
from diffusion_po.objectives.dpo import BetaOptions, implicit_reward_z
from diffusion_po.objectives.paired import paired_errors


def loss(err_w: torch.Tensor, err_l: torch.Tensor, ref_err_w: torch.Tensor, ref_err_l: torch.Tensor,
         beta: float = 5000.0, tau: float = 0.1) -> tuple[torch.Tensor, Metrics]:
    """IPO loss over 1-D per-sample errors (fp32): mean((h - 1/(2 tau))^2), h the DPO implicit reward z."""
    h = implicit_reward_z(err_w, err_l, ref_err_w, ref_err_l, beta)
    total = (h - 1.0 / (2.0 * tau)).pow(2).mean()
    return total, {"loss": total.detach(), "reward_margin": h.mean().detach(),
                   "implicit_acc": (h > 0).float().mean().detach()}


class IPO(Method):
    """Pairs (winner, loser) with shared noise and t, a reference, and the IPO loss."""

    name = "ipo"
    data_formats = ("pickapic", "pairs")
    needs_reference = True

    @dataclasses.dataclass
    class Options(BetaOptions):  # beta_dpo (also the top-level `beta_dpo:`), plus:
        tau: float = 0.1
        """IPO's regularisation: the margin h is regressed to 1/(2 tau)."""

        def __post_init__(self) -> None:
            super().__post_init__()
            check_option(self.tau > 0, "tau", "be positive", self.tau)

    def compute_loss(self, ctx: TrainContext, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        e = paired_errors(ctx, batch)
        return loss(e["err_w"], e["err_l"], e["ref_err_w"], e["ref_err_l"], beta=self.options.beta_dpo,
                    tau=self.options.tau)
