"""NPO guidance (Wang et al., ICLR 2025, arXiv 2505.11245): CFG whose unconditional/negative branch is
computed by a negative-preference model theta^-:

    eps_hat = eps_{theta^-}(x_t, c_neg) + w * (eps_{theta^+}(x_t, c) - eps_{theta^-}(x_t, c_neg))

The formula is CFG's; only the weights that compute the base branch differ. The sampler attaches the
negative model (`diffusion_po.sampling.NegativeModel`: an NPO LoRA on the same network, run in the same
forward with peft mixed-adapter batches, or a separate merged network). With Perp-Neg, eps_0 and the
negative prompts come from theta^- and the positives from theta^+.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from diffusion_po.guidance.cfg import CFG, cfg


def npo_cfg(neg_model_base: torch.Tensor, pos_model_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """eps_{theta^-}(c_neg) + w (eps_{theta^+}(c) - eps_{theta^-}(c_neg)): `cfg` with the base from theta^-."""
    return cfg(neg_model_base, pos_model_cond, scale)


class NPO(CFG):
    """CFG that insists on a negative model (so a missing NPO weight is an error, not silent plain CFG)."""

    name: ClassVar[str] = "npo"
    requires_negative_model: ClassVar[bool] = True

