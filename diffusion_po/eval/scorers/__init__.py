"""Scorer registry: ``build_scorer(name, ...)`` for pickscore, hps_v2, hps_v2.1, clip, clip_openclip,
aesthetic, (optional) imagereward, and the scorers of other packages named in :data:`EXTERNAL_SCORERS`
(the toy world's oracle). Heavy imports happen only when a scorer is built."""

from __future__ import annotations

import importlib
from typing import Any

from diffusion_po.errors import UserError
from diffusion_po.eval.scorers.base import Scorer, as_embedding, l2_normalize

#: scorers that live outside diffusion_po.eval: name -> "module:Class", imported only when built
EXTERNAL_SCORERS = {"toy": "diffusion_po.toy.scorer:ToyOracleScorer",
                    "toy_compositional": "diffusion_po.toy.scorer:ToyCompositionalScorer"}

SCORER_NAMES = ("pickscore", "hps_v2", "hps_v2.1", "clip", "clip_openclip", "aesthetic", "imagereward",
                *EXTERNAL_SCORERS)

# accepted spellings -> registry name
ALIASES = {
    "hps": "hps_v2.1",
    "hpsv2": "hps_v2",
    "hps_v2.0": "hps_v2",
    "hpsv2.1": "hps_v2.1",
    "hps_v21": "hps_v2.1",
    "aesthetic_v2": "aesthetic",
    "aesthetics": "aesthetic",
    "clip_score": "clip",
    "clip_h": "clip_openclip",
    "image_reward": "imagereward",
    "toy_oracle": "toy",
}

# constructor options each scorer accepts through `--checkpoint NAME.OPTION=VALUE`
SCORER_OPTIONS = {
    "pickscore": ("checkpoint", "processor"),
    "hps_v2": ("checkpoint", "arch"),
    "hps_v2.1": ("checkpoint", "arch"),
    "clip": ("checkpoint",),
    "clip_openclip": ("checkpoint",),
    "aesthetic": ("checkpoint", "backbone"),
    "imagereward": ("checkpoint", "med_config", "tokenizer"),
    "toy": ("bias_colour", "bias_weight"),  # a known bias (diffusion_po.toy.scorer)
    "toy_compositional": ("bias_colour", "bias_weight"),
}


def canonical_name(name: str) -> str:
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in SCORER_NAMES:
        raise UserError(f"unknown metric '{name}'; choose from {', '.join(SCORER_NAMES)}")
    return key


def parse_metric_list(spec: str | list[str] | None) -> list[str]:
    """'pickscore,hps_v2.1' -> ['pickscore', 'hps_v2.1'] (canonical, without duplicates)."""
    if spec is None:
        return []
    items = spec.split(",") if isinstance(spec, str) else [x for s in spec for x in s.split(",")]
    return list(dict.fromkeys(canonical_name(x) for x in items if x.strip()))


def build_scorer(
    name: str,
    models_root: str | None = None,
    device: str | None = None,
    dtype: str = "fp32",
    **options: Any,
) -> Scorer:
    """Load the scorer ``name`` once. ``options`` are that scorer's constructor options
    (``checkpoint``: a local path or hub id, ``processor``, ``arch``, ``backbone``, ...)."""
    key = canonical_name(name)
    allowed = SCORER_OPTIONS[key]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise UserError(f"{key}: unknown option(s) {', '.join(unknown)}; accepted: {', '.join(allowed)}")
    if key in EXTERNAL_SCORERS:
        module, cls = EXTERNAL_SCORERS[key].split(":")
        return getattr(importlib.import_module(module), cls)(device=device, dtype=dtype, **options)
    common: dict[str, Any] = {"models_root": models_root, "device": device, "dtype": dtype}
    if key == "pickscore":
        from diffusion_po.eval.scorers.hf_clip import PickScoreScorer

        return PickScoreScorer(**options, **common)
    if key in ("hps_v2", "hps_v2.1"):
        from diffusion_po.eval.scorers.openclip import HPSScorer

        return HPSScorer(version="v2.1" if key == "hps_v2.1" else "v2.0", **options, **common)
    if key == "clip":
        from diffusion_po.eval.scorers.hf_clip import CLIPScoreScorer

        return CLIPScoreScorer(**options, **common)
    if key == "clip_openclip":
        from diffusion_po.eval.scorers.openclip import OpenClipScoreScorer

        return OpenClipScoreScorer(**options, **common)
    if key == "aesthetic":
        from diffusion_po.eval.scorers.hf_clip import AestheticScorer

        return AestheticScorer(**options, **common)
    from diffusion_po.eval.scorers.imagereward import ImageRewardScorer

    return ImageRewardScorer(**options, **common)


def parse_checkpoint_options(items: list[str] | None) -> dict[str, dict[str, str]]:
    """``['pickscore=/m/PickScore_v1', 'aesthetic.backbone=/m/clip-l']`` ->
    ``{'pickscore': {'checkpoint': ...}, 'aesthetic': {'backbone': ...}}``."""
    out: dict[str, dict[str, str]] = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"--checkpoint expects NAME=PATH or NAME.OPTION=VALUE, got '{item}'")
        key, value = item.split("=", 1)
        # 'hps_v2.1' contains a dot itself: match the longest scorer name first
        name, option = key, "checkpoint"
        for candidate in sorted(list(SCORER_NAMES) + list(ALIASES), key=len, reverse=True):
            if key == candidate:
                break
            if key.startswith(candidate + "."):
                name, option = candidate, key[len(candidate) + 1 :]
                break
        name = canonical_name(name)
        if option not in SCORER_OPTIONS[name]:
            raise UserError(f"--checkpoint {item}: {name} has no option '{option}' ({', '.join(SCORER_OPTIONS[name])})")
        out.setdefault(name, {})[option] = value
    return out


__all__ = [
    "ALIASES", "EXTERNAL_SCORERS", "SCORER_NAMES", "SCORER_OPTIONS", "Scorer", "as_embedding", "build_scorer", "canonical_name",
    "l2_normalize", "parse_checkpoint_options", "parse_metric_list",
]
