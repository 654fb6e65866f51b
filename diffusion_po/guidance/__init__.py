"""Guidance methods as pure functions of branch predictions (see docs/sampling.md).

Functions: `cfg`, `composable`, `perp`, `perp_neg`, `npo_cfg`, `rescale_noise_cfg`.
Classes (used by the sampler): `CFG`, `Composable`, `PerpNeg`, `NPO`; `make_guidance(name, scale, rescale)`.
"""

from diffusion_po.guidance.base import (
    POS0,
    UNCOND,
    Branch,
    Guidance,
    Predictions,
    per_sample_dot,
    rescale_noise_cfg,
)
from diffusion_po.guidance.cfg import CFG, Composable, cfg, composable
from diffusion_po.guidance.npo import NPO, npo_cfg
from diffusion_po.guidance.perp_neg import ZERO_NORM_EPS, PerpNeg, perp, perp_neg

GUIDANCE_METHODS: dict[str, type[Guidance]] = {c.name: c for c in (CFG, Composable, PerpNeg, NPO)}


def make_guidance(name: str, scale: float = 7.5, rescale: float = 0.0) -> Guidance:
    """Guidance by name: 'cfg', 'composable', 'perp-neg' or 'npo' (underscores accepted)."""
    key = name.lower().replace("_", "-")
    if key == "perpneg":
        key = "perp-neg"
    if key not in GUIDANCE_METHODS:
        raise ValueError(f"unknown guidance '{name}'; choose one of {', '.join(GUIDANCE_METHODS)}")
    return GUIDANCE_METHODS[key](scale=scale, rescale=rescale)


__all__ = [
    "CFG", "Composable", "GUIDANCE_METHODS", "NPO", "POS0", "PerpNeg", "UNCOND", "ZERO_NORM_EPS", "Branch",
    "Guidance", "Predictions", "cfg", "composable", "make_guidance", "npo_cfg", "per_sample_dot", "perp",
    "perp_neg", "rescale_noise_cfg",
]
