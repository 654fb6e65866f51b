"""`eval compare`: model A against model B on paired images.

Per metric: mean and median of each side with 95% bootstrap intervals, the paired mean difference,
the win rate of A over B (ties count half; Diffusion-NPO's P(A>B), P(A<B) also kept), and for
PickScore the soft win probability ``mean sigmoid(s_A - s_B)``. With several images per prompt the
bootstrap resamples prompts (cluster bootstrap). Per-category breakdowns use the prompt categories
(PartiPrompts categories, HPS styles, GenEval tasks). For HPS metrics on the HPSv2 benchmark prompts
the leaderboard form is added: per style the mean of ten equal consecutive chunks' means (x100 scale
already) and their standard deviation, and the average over all images.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from diffusion_po.errors import DataError
from diffusion_po.eval.manifest import group_key, pair_keys
from diffusion_po.eval.prompts import HPS_STYLES
from diffusion_po.eval.scorers import ALIASES, SCORER_NAMES
from diffusion_po.eval.scoring import load_score_table
from diffusion_po.eval.stats import bootstrap_mean_ci, paired_win_rate, soft_win_probability

NON_METRIC_COLUMNS = {"image", "prompt", "prompt_index", "prompt_id", "category", "k", "seed", "_path"}


def metric_columns(rows: list[dict[str, Any]], meta: dict[str, Any]) -> list[str]:
    """Numeric score columns of a score table (primary metrics first)."""
    cols: list[str] = []
    for info in meta.get("scorers", {}).values():
        cols.extend(info.get("metrics", []))
    if not cols and rows:
        cols = [k for k, v in rows[0].items() if k not in NON_METRIC_COLUMNS and isinstance(v, (int, float))]
    return list(dict.fromkeys(cols))


def resolve_metric(name: str, columns: list[str], meta: dict[str, Any]) -> str:
    """A user metric name -> a score column: exact column, or a scorer name -> its primary metric."""
    if name in columns:
        return name
    key = ALIASES.get(name.lower(), name.lower())
    info = meta.get("scorers", {}).get(key)
    if info and info.get("primary") in columns:
        return info["primary"]
    if key in SCORER_NAMES:
        prefixed = [c for c in columns if c.startswith(key)]
        if prefixed:
            return prefixed[0]
    raise DataError(f"metric '{name}' is not in the score table (columns: {', '.join(columns) or 'none'})")


def _finite(rows: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    return [r for r in rows if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]


def pair_rows(rows_a: list[dict[str, Any]], rows_b: list[dict[str, Any]]) -> tuple[list[tuple[dict, dict]], dict]:
    """Pair two runs' rows by (prompt, sample) keys; returns the pairs and pairing diagnostics."""
    index_b = dict(zip(pair_keys(rows_b), rows_b))
    pairs, prompt_mismatch, seed_mismatch = [], 0, 0
    for key, ra in zip(pair_keys(rows_a), rows_a):
        rb = index_b.get(key)
        if rb is None:
            continue
        if ra.get("prompt") != rb.get("prompt"):
            prompt_mismatch += 1
            continue
        if ra.get("seed") is not None and rb.get("seed") is not None and ra["seed"] != rb["seed"]:
            seed_mismatch += 1
        pairs.append((ra, rb))
    diag = {
        "n_a": len(rows_a),
        "n_b": len(rows_b),
        "n_pairs": len(pairs),
        "prompt_mismatches": prompt_mismatch,
        "seed_mismatches": seed_mismatch,
        "seed_paired": seed_mismatch == 0 and all(ra.get("seed") is not None for ra, _ in pairs),
    }
    return pairs, diag


def summarize(values: np.ndarray, groups: list[str] | None, n_boot: int, seed: int) -> dict[str, float]:
    mean = bootstrap_mean_ci(values, n_boot=n_boot, seed=seed, groups=groups)
    median = bootstrap_mean_ci(values, n_boot=n_boot, seed=seed, groups=groups, statistic="median")
    return {
        "n": int(values.size),
        "mean": mean.value, "mean_lo": mean.lo, "mean_hi": mean.hi,
        "median": median.value, "median_lo": median.lo, "median_hi": median.hi,
        "std": float(values.std(ddof=1)) if values.size > 1 else 0.0,
    }


def hps_leaderboard(rows: list[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    """The HPSv2 leaderboard numbers: per style, mean of 10 consecutive chunk means and their (population)
    std, in prompt order; "average" = mean over all images. None unless the rows are HPS-benchmark rows."""
    by_style: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in _finite(rows, metric):
        if r.get("category") in HPS_STYLES:
            by_style[r["category"]].append((int(r.get("prompt_index") or 0), float(r[metric])))
    if not by_style:
        return None
    out: dict[str, Any] = {"styles": {}}
    everything: list[float] = []
    for style in HPS_STYLES:
        if style not in by_style:
            continue
        vals = [v for _, v in sorted(by_style[style], key=lambda t: t[0])]
        everything.extend(vals)
        chunks = [c for c in np.array_split(np.asarray(vals), 10) if c.size]
        means = [float(c.mean()) for c in chunks]
        out["styles"][style] = {"n": len(vals), "mean": float(np.mean(means)), "chunk_std": float(np.std(means))}
    out["average"] = float(np.mean(everything))
    out["n"] = len(everything)
    out["complete"] = all(s in by_style for s in HPS_STYLES)
    return out


def compare_tables(
    rows_a: list[dict[str, Any]],
    rows_b: list[dict[str, Any]],
    metrics: list[str],
    *,
    meta_a: dict[str, Any] | None = None,
    meta_b: dict[str, Any] | None = None,
    label_a: str = "A",
    label_b: str = "B",
    n_boot: int = 2000,
    seed: int = 0,
    tie_tol: float = 0.0,
) -> dict[str, Any]:
    """Compare two score tables; returns a JSON-able result (see the module docstring)."""
    meta_a, meta_b = meta_a or {}, meta_b or {}
    cols_a, cols_b = metric_columns(rows_a, meta_a), metric_columns(rows_b, meta_b)
    if not metrics:
        metrics = [c for c in cols_a if c in cols_b]
        primaries = [i.get("primary") for i in meta_a.get("scorers", {}).values()]
        metrics = [m for m in metrics if m in primaries] or metrics
    if not metrics:
        raise DataError("the two score tables have no metric in common")
    pairs, diag = pair_rows(rows_a, rows_b)
    if not pairs:
        raise DataError(
            "no image of A pairs with an image of B (pairs need the same prompt and the same "
            "prompt_id/prompt_index and k or seed)"
        )
    result: dict[str, Any] = {
        "a": {"label": label_a, "n_images": len(rows_a)},
        "b": {"label": label_b, "n_images": len(rows_b)},
        "pairing": diag,
        "n_boot": n_boot,
        "seed": seed,
        "metrics": {},
        "scorers_a": meta_a.get("scorers", {}),
        "scorers_b": meta_b.get("scorers", {}),
    }
    for name in metrics:
        col = resolve_metric(name, cols_a, meta_a)
        resolve_metric(col, cols_b, meta_b)
        both = [(ra, rb) for ra, rb in pairs if _finite([ra], col) and _finite([rb], col)]
        if not both:
            raise DataError(f"metric {col}: no pair has a score on both sides (run `eval score` first)")
        a = np.array([ra[col] for ra, _ in both], dtype=np.float64)
        b = np.array([rb[col] for _, rb in both], dtype=np.float64)
        groups = [group_key(ra) for ra, _ in both]
        use_groups = groups if len(set(groups)) < len(groups) else None
        wr = paired_win_rate(a, b, n_boot=n_boot, seed=seed, tie_tol=tie_tol, groups=use_groups)
        diff = bootstrap_mean_ci(a - b, n_boot=n_boot, seed=seed, groups=use_groups)
        entry: dict[str, Any] = {
            "column": col,
            "n_pairs": len(both),
            "n_prompts": len(set(groups)),
            "a": summarize(a, use_groups, n_boot, seed),
            "b": summarize(b, use_groups, n_boot, seed),
            "diff": {"mean": diff.value, "lo": diff.lo, "hi": diff.hi},
            "win_rate": wr.to_dict(),
        }
        if col == "pickscore":
            soft = soft_win_probability(a, b, n_boot=n_boot, seed=seed, groups=use_groups)
            entry["soft_win"] = soft.to_dict()
        cats: dict[str, list[int]] = defaultdict(list)
        for i, (ra, _) in enumerate(both):
            if ra.get("category"):
                cats[str(ra["category"])].append(i)
        if cats:
            by_cat = {}
            for cat, idx in sorted(cats.items()):
                sel = np.asarray(idx)
                g = [groups[i] for i in idx] if use_groups else None
                cwr = paired_win_rate(a[sel], b[sel], n_boot=n_boot, seed=seed, tie_tol=tie_tol, groups=g)
                by_cat[cat] = {
                    "n": int(sel.size),
                    "a_mean": float(a[sel].mean()),
                    "b_mean": float(b[sel].mean()),
                    "win_rate": cwr.win_rate,
                    "lo": cwr.lo,
                    "hi": cwr.hi,
                }
            entry["by_category"] = by_cat
        if col.startswith("hps"):
            lb_a = hps_leaderboard([ra for ra, _ in both], col)
            lb_b = hps_leaderboard([rb for _, rb in both], col)
            if lb_a and lb_b:
                entry["hps_benchmark"] = {"a": lb_a, "b": lb_b}
        result["metrics"][col] = entry
    return result


def compare_runs(
    a: str | Path,
    b: str | Path,
    metrics: list[str] | None = None,
    *,
    label_a: str | None = None,
    label_b: str | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Load two scored runs (folders with scores.parquet, or score files) and compare them."""
    rows_a, meta_a = load_score_table(a)
    rows_b, meta_b = load_score_table(b)
    result = compare_tables(
        rows_a, rows_b, list(metrics or []), meta_a=meta_a, meta_b=meta_b,
        label_a=label_a or Path(a).name, label_b=label_b or Path(b).name, **kwargs,
    )
    result["a"]["path"] = str(a)
    result["b"]["path"] = str(b)
    result["a"]["throughput"] = meta_a.get("throughput")
    result["b"]["throughput"] = meta_b.get("throughput")
    result["a"]["random_weights"] = meta_a.get("random_weights")
    result["b"]["random_weights"] = meta_b.get("random_weights")
    return result


def format_summary(result: dict[str, Any]) -> str:
    """A short plain-text table for the terminal."""
    la, lb = result["a"]["label"], result["b"]["label"]
    lines = [f"{la} vs {lb}: {result['pairing']['n_pairs']} pairs"]
    for col, e in result["metrics"].items():
        wr = e["win_rate"]
        line = (
            f"  {col:<34} {la} {e['a']['mean']:.4f} [{e['a']['mean_lo']:.4f}, {e['a']['mean_hi']:.4f}]  "
            f"{lb} {e['b']['mean']:.4f}  win {100 * wr['win_rate']:.1f}% [{100 * wr['lo']:.1f}, {100 * wr['hi']:.1f}]"
        )
        if "soft_win" in e:
            line += f"  soft {100 * e['soft_win']['value']:.1f}%"
        lines.append(line)
        if "hps_benchmark" in e:
            for side, lab in (("a", la), ("b", lb)):
                lb_ = e["hps_benchmark"][side]
                styles = "  ".join(f"{s} {v['mean']:.2f}±{v['chunk_std']:.4f}" for s, v in lb_["styles"].items())
                lines.append(f"    HPS benchmark {lab}: {styles}  average {lb_['average']:.2f}")
    return "\n".join(lines)
