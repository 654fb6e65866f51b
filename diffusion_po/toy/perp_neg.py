"""Perp-Neg vs a plain negative prompt in the toy world, when main and negative prompts overlap.

    diffusion-po toy perp-neg [--out runs/toy_perp_neg] [--model DIR] [--n 240] [--seed 0]

Prompts are held-out two-shape captions with two
different colours ("a large red circle and a small blue square"); the negative prompt is the colour
word of one of the shapes ("red"), so main and negative prompts overlap. Per image (oracle of
`diffusion_po.toy.oracle`):
- *keep*: the other shape (not of the negative colour) has the right colour and shape
  (`colour_ok` and `shape_ok`), and the negative-coloured shape keeps its form (`shape_ok`): the
  main prompt's content that the negative does not name;
- *removed*: the negative colour covers < 1% of the image (`colour_fraction`);
- *keep score*: the other shape's oracle score (0.30 colour + 0.25 shape + 0.15 size + 0.15 position)/0.85.
Methods: cfg (no negative), negative-prompt CFG, Perp-Neg (weights 1 and 1.5), composable. Rates
and means carry 95% bootstrap intervals; Perp-Neg vs negative prompt is also a paired win rate on the
keep score (same caption and seed).

NPO guidance vs plain CFG is `diffusion-po toy method npo` (the toy protocol of every method).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from diffusion_po.sampling.sampler import PromptSpec
from diffusion_po.toy import oracle, world
from diffusion_po.toy.pairs import DEFAULT_SCALE, DEFAULT_SCHEDULER, DEFAULT_STEPS

REMOVED_FRACTION = 0.01


def overlap_items(n: int, seed: int = 0) -> list[tuple[str, str, int]]:
    """n (caption, negative colour, index of the shape that has it): held-out two-colour captions,
    the negative alternating between the first and the second shape's colour."""
    pool = [c for c in world.split_captions("test") if world.parse_caption(c).layout != "single"]
    pool = [c for c in pool if len(set(world.parse_caption(c).colours())) == 2]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(pool))
    items = []
    for k in range(n):
        caption = pool[order[k % len(pool)]]
        which = (k // len(pool) + k) % 2
        items.append((caption, world.parse_caption(caption).colours()[which], which))
    return items


def score_overlap(image: Any, caption: str, neg_colour: str, which: int) -> dict[str, float]:
    """keep / removed / keep_score (see the module docstring) of one image."""
    result = oracle.score(image, caption)
    other = result.shapes[1 - which]
    target = result.shapes[which]
    keep_score = (0.30 * other.colour + 0.25 * other.shape + 0.15 * other.size + 0.15 * other.position) / 0.85
    frac = oracle.colour_fraction(image, neg_colour)
    return {
        "keep": float(other.colour_ok and other.shape_ok and target.shape_ok),
        "other_ok": float(other.colour_ok and other.shape_ok),
        "target_shape_ok": float(target.shape_ok),
        "removed": float(frac < REMOVED_FRACTION),
        "neg_fraction": frac,
        "keep_score": keep_score,
        "reward": result.reward,
    }


def _ci(values: list[float]) -> dict[str, float]:
    from diffusion_po.eval.stats import bootstrap_mean_ci

    ci = bootstrap_mean_ci(np.asarray(values, dtype=float))
    return {"mean": round(float(ci.value), 4), "lo": round(float(ci.lo), 4), "hi": round(float(ci.hi), 4)}


def run_perp_neg(
    out: str | Path | None,
    model: str | None = None,
    n: int = 240,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    scale: float = DEFAULT_SCALE,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Perp-Neg vs negative-prompt CFG with overlapping concepts on the toy base (or the pipeline folder
    `model`); writes results.json, report.md and a grid per method into `out` (nothing when None)."""
    from diffusion_po.eval.stats import paired_win_rate
    from diffusion_po.guidance import CFG, Composable, PerpNeg
    from diffusion_po.sampling import generate
    from diffusion_po.sampling.io import make_grid
    from diffusion_po.toy.build import ensure_base
    from diffusion_po.toy.pairs import load_pipeline

    pipe = load_pipeline(ensure_base(model, world_name="simple"))
    items = overlap_items(n, seed)
    seeds = [seed * 100_000 + i for i in range(n)]
    methods: dict[str, tuple[Any, float | None]] = {
        "cfg": (CFG(scale), None),
        "negative-prompt": (CFG(scale), 1.0),
        "perp-neg": (PerpNeg(scale), 1.0),
        "perp-neg-w1.5": (PerpNeg(scale), 1.5),
        "composable": (Composable(scale), 1.0),
    }
    per_method: dict[str, list[dict[str, float]]] = {}
    for name, (guidance, weight) in methods.items():
        specs = [
            PromptSpec(cap, s, [(colour, weight)] if weight is not None else [])
            for (cap, colour, _), s in zip(items, seeds)
        ]
        images = generate(pipe, specs, guidance=guidance, steps=steps, batch_size=batch_size,
                          scheduler=DEFAULT_SCHEDULER, progress=True)
        per_method[name] = [score_overlap(im, cap, col, w) for im, (cap, col, w) in zip(images, items)]
        if out:
            grid_dir = Path(out)
            grid_dir.mkdir(parents=True, exist_ok=True)
            make_grid(images[:32], 8).resize((8 * 96, 4 * 96), 0).save(grid_dir / f"grid_{name}.png")
    summary = {
        name: {k: _ci([r[k] for r in rows]) for k in ("keep", "other_ok", "target_shape_ok", "removed", "neg_fraction", "keep_score", "reward")}
        for name, rows in per_method.items()
    }
    paired = {}
    for a in ("perp-neg", "perp-neg-w1.5"):
        for key in ("keep_score", "reward"):
            wr = paired_win_rate([r[key] for r in per_method[a]], [r[key] for r in per_method["negative-prompt"]])
            paired[f"{a} vs negative-prompt ({key})"] = {
                "win_rate": round(wr.win_rate, 4), "lo": round(wr.lo, 4), "hi": round(wr.hi, 4), "n": wr.n,
            }
    results = {"n": n, "steps": steps, "scale": scale, "scheduler": DEFAULT_SCHEDULER, "seed": seed,
               "summary": summary, "paired": paired}
    _write(out, results, "Perp-Neg vs negative prompt (overlapping concepts)")
    return results


def _write(out: str | Path | None, results: dict[str, Any], title: str) -> None:
    if not out:
        return
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results, indent=2))
    lines = [f"# {title}", "", "```", json.dumps(results, indent=2), "```", ""]
    (folder / "report.md").write_text("\n".join(lines))


__all__ = ["REMOVED_FRACTION", "overlap_items", "run_perp_neg", "score_overlap"]
