"""Markdown benchmark report with plots (score histograms, per-category win rates)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "metric"


def _ci(v: float, lo: float, hi: float, pct: bool = False, digits: int = 3) -> str:
    if pct:
        return f"{100 * v:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"
    return f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def plot_histogram(
    values_a: list[float], values_b: list[float], label_a: str, label_b: str, metric: str, path: Path
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 3.6))
    allv = np.asarray(list(values_a) + list(values_b), dtype=float)
    lo, hi = (float(allv.min()), float(allv.max())) if allv.size else (0.0, 1.0)
    bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 30)
    ax.hist(values_b, bins=bins, alpha=0.55, label=label_b, color="tab:gray")
    ax.hist(values_a, bins=bins, alpha=0.55, label=label_a, color="tab:blue")
    ax.axvline(float(np.mean(values_b)), color="tab:gray", ls="--", lw=1)
    ax.axvline(float(np.mean(values_a)), color="tab:blue", ls="--", lw=1)
    ax.set_xlabel(metric)
    ax.set_ylabel("images")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_categories(entry: dict[str, Any], label_a: str, label_b: str, metric: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cats = entry["by_category"]
    names = list(cats)
    wr = np.array([cats[c]["win_rate"] for c in names]) * 100
    lo = np.array([cats[c]["lo"] for c in names]) * 100
    hi = np.array([cats[c]["hi"] for c in names]) * 100
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(names) + 1.4))
    y = np.arange(len(names))
    ax.barh(y, wr, xerr=[wr - lo, hi - wr], color="tab:blue", alpha=0.8, capsize=3)
    ax.axvline(50, color="black", lw=1, ls="--")
    ax.set_yticks(y, [f"{n} ({cats[n]['n']})" for n in names])
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel(f"win rate of {label_a} over {label_b} (%), {metric}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(
    result: dict[str, Any],
    out: str | Path,
    rows_a: list[dict[str, Any]] | None = None,
    rows_b: list[dict[str, Any]] | None = None,
    *,
    title: str | None = None,
    settings: dict[str, Any] | None = None,
) -> Path:
    """Write ``<out>/report.md``, ``<out>/compare.json`` and ``<out>/plots/*.png``; returns the report path."""
    from diffusion_po.eval.compare import pair_rows

    out = Path(out)
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    la, lb = result["a"]["label"], result["b"]["label"]
    (out / "compare.json").write_text(json.dumps(result, indent=1, default=str))
    pairs = pair_rows(rows_a, rows_b)[0] if rows_a is not None and rows_b is not None else []

    md: list[str] = [f"# {title or f'{la} vs {lb}'}", ""]
    p = result["pairing"]
    md.append(
        f"{p['n_pairs']} paired images ({la}: {p['n_a']}, {lb}: {p['n_b']}); "
        f"{'same seeds on both sides' if p['seed_paired'] else 'NOT seed-paired: seeds differ or are unknown'}. "
        f"Intervals: 95% percentile bootstrap, {result['n_boot']} resamples"
        f"{' over prompts' if any(e['n_prompts'] < e['n_pairs'] for e in result['metrics'].values()) else ''}."
    )
    md.append("")
    for side, label in (("a", la), ("b", lb)):
        random = result[side].get("random_weights") or {}
        if random.get("any"):
            what = ", ".join([*random.get("models", []), *(f"scorer {n}" for n in random.get("scorers", []))])
            md += [f"**{label}: {random.get('note', 'random test weights')}** ({what}).", ""]
    if settings:
        md += ["## Settings", "", "| key | value |", "|---|---|"]
        md += [f"| {k} | `{v}` |" for k, v in settings.items()]
        md.append("")

    md += [
        "## Summary",
        "",
        f"| metric | {la} mean | {lb} mean | {la} median | {lb} median | mean diff | win rate of {la} | soft win |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for col, e in result["metrics"].items():
        soft = _ci(e["soft_win"]["value"], e["soft_win"]["lo"], e["soft_win"]["hi"], pct=True) if "soft_win" in e else "-"
        wr = e["win_rate"]
        md.append(
            f"| {col} | {_ci(e['a']['mean'], e['a']['mean_lo'], e['a']['mean_hi'])} | "
            f"{_ci(e['b']['mean'], e['b']['mean_lo'], e['b']['mean_hi'])} | "
            f"{e['a']['median']:.3f} | {e['b']['median']:.3f} | "
            f"{_ci(e['diff']['mean'], e['diff']['lo'], e['diff']['hi'])} | "
            f"{_ci(wr['win_rate'], wr['lo'], wr['hi'], pct=True)} (W/T/L {wr['wins']}/{wr['ties']}/{wr['losses']}) | {soft} |"
        )
    md += [
        "",
        "Win rate = (wins + ties/2) / pairs. Soft win (PickScore only) = mean sigmoid(s_A - s_B), the "
        "PickScore preference probability. PickScore is exp(logit_scale)·cos; HPS is 100·cos.",
        "",
    ]

    for col, e in result["metrics"].items():
        md += [f"## {col}", ""]
        if pairs:
            va = [ra[col] for ra, rb in pairs if ra.get(col) is not None and rb.get(col) is not None]
            vb = [rb[col] for ra, rb in pairs if ra.get(col) is not None and rb.get(col) is not None]
            hist = plot_histogram(va, vb, la, lb, col, plots / f"hist_{_slug(col)}.png")
            md += [f"![{col} histogram](plots/{hist.name})", ""]
        if "hps_benchmark" in e:
            styles = list(e["hps_benchmark"]["a"]["styles"])
            md += [
                "HPS benchmark (leaderboard form: per style, mean and std of ten chunk means):",
                "",
                "| model | " + " | ".join(styles) + " | Average |",
                "|---|" + "---|" * (len(styles) + 1),
            ]
            for side, lab in (("a", la), ("b", lb)):
                s = e["hps_benchmark"][side]
                cells = [f"{s['styles'][st]['mean']:.2f} ± {s['styles'][st]['chunk_std']:.4f}" for st in styles]
                md.append(f"| {lab} | " + " | ".join(cells) + f" | {s['average']:.2f} |")
            md.append("")
        if e.get("by_category"):
            cat_plot = plot_categories(e, la, lb, col, plots / f"categories_{_slug(col)}.png")
            md += [
                f"![{col} by category](plots/{cat_plot.name})",
                "",
                f"| category | n | {la} mean | {lb} mean | win rate of {la} |",
                "|---|---|---|---|---|",
            ]
            for cat, c in e["by_category"].items():
                md.append(
                    f"| {cat} | {c['n']} | {c['a_mean']:.3f} | {c['b_mean']:.3f} | "
                    f"{_ci(c['win_rate'], c['lo'], c['hi'], pct=True)} |"
                )
            md.append("")

    md += ["## Scorers", "", "| metric | version | checkpoint sha256 |", "|---|---|---|"]
    for info in {**result.get("scorers_b", {}), **result.get("scorers_a", {})}.values():
        md.append(f"| {', '.join(info.get('metrics', []))} | {info.get('version')} | `{info.get('checkpoint_hash')}` |")
    md.append("")
    thr = [(result[s]["label"], result[s].get("throughput")) for s in ("a", "b")]
    if any(t for _, t in thr):
        md += ["## Scoring throughput", "", "| run | images | images/s (wall) | per scorer (model time only) | batch | workers |",
               "|---|---|---|---|---|---|"]
        for lab, t in thr:
            if t:
                per = ", ".join(f"{k}: {v}" for k, v in (t.get("per_scorer_images_per_second") or {}).items())
                md.append(
                    f"| {lab} | {t.get('images_scored')} | {t.get('images_per_second')} | {per} | "
                    f"{t.get('batch_size')} | {t.get('num_workers')} |"
                )
        md.append("")
    path = out / "report.md"
    path.write_text("\n".join(md))
    return path
