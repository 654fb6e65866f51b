"""`eval parity`: compare this package's scores with values from the official scorers.

The official values are computed once, by the user, with the official code in its own environment
(docs/evaluation.md gives the scripts) and stored as JSON: ``{metric: value or [values per image]}``
on this package's scales (PickScore = exp(logit_scale)·cos, HPS = 100·cos). The reference case is
HPSv2's ``assets/demo_image.jpg`` with the prompt "A cat with two horns on its head".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image

from diffusion_po.errors import DataError
from diffusion_po.eval.scorers import Scorer
from diffusion_po.eval.scorers.base import flatten_on_white

DEMO_PROMPT = "A cat with two horns on its head"
DEFAULT_TOLERANCE = {"pickscore": 0.1, "pickscore_cos": 0.001, "hps_v2": 0.05, "hps_v2.1": 0.05,
                     "aesthetic_v2": 0.01, "imagereward": 0.01}


def run_parity(
    images: list[str | Path],
    prompts: list[str],
    scorers: list[Scorer],
    official: dict[str, Any] | None = None,
    tolerance: float | None = None,
) -> dict[str, Any]:
    """Score ``images`` with ``scorers`` and, with ``official`` values, check each |ours - official|."""
    if len(prompts) == 1 and len(images) > 1:
        prompts = prompts * len(images)
    if len(prompts) != len(images):
        raise DataError(f"{len(images)} images but {len(prompts)} prompts")
    pil = []
    for p in images:
        try:
            with Image.open(p) as im:
                pil.append(flatten_on_white(im))  # the scorers' rule for transparent images
        except OSError as exc:
            raise DataError(f"{p}: cannot read image ({exc})") from exc
    ours: dict[str, list[float]] = {}
    for s in scorers:
        ours.update(s.score_all(pil, prompts))
    checks = []
    for metric, values in (official or {}).items():
        if metric not in ours:
            raise DataError(f"official value for '{metric}' but no scorer produced it (have {', '.join(ours)})")
        ref = values if isinstance(values, list) else [values]
        if len(ref) != len(images):
            raise DataError(f"official '{metric}' has {len(ref)} values for {len(images)} images")
        tol = tolerance if tolerance is not None else DEFAULT_TOLERANCE.get(metric, 0.05)
        for i, (a, b) in enumerate(zip(ours[metric], ref)):
            checks.append({"metric": metric, "image": str(images[i]), "ours": a, "official": float(b),
                           "abs_diff": abs(a - float(b)), "tolerance": tol, "ok": abs(a - float(b)) <= tol})
    return {
        "images": [str(p) for p in images],
        "prompts": prompts,
        "scores": ours,
        "scorers": {s.name: s.info() for s in scorers},
        "checks": checks,
        "ok": all(c["ok"] for c in checks),
    }


def load_official(path: str | Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the official values ({exc})") from exc
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object {{metric: value or [values]}}")
    return data
