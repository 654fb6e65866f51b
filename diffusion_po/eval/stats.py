"""Paired statistics for comparing two models' per-image scores.

All functions take per-item scores that are *paired*: item ``i`` of ``scores_a`` and of
``scores_b`` come from the same prompt and the same seed. Confidence intervals are percentile
bootstrap intervals over items (or over ``groups``, e.g. prompts, when several images share one
prompt: a cluster bootstrap), with a fixed ``seed`` so reports are reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

__all__ = [
    "MeanCI",
    "WinRate",
    "bootstrap_ci",
    "bootstrap_mean_ci",
    "paired_outcomes",
    "paired_win_rate",
    "sigmoid",
    "soft_win_probability",
]

_CHUNK_ELEMENTS = 4_000_000  # bootstrap index matrix is built in chunks of about this many entries


@dataclass(frozen=True)
class WinRate:
    """Win rate of A over B: ``(wins + 0.5 * ties) / n`` with a bootstrap interval ``[lo, hi]``."""

    win_rate: float
    lo: float
    hi: float
    n: int
    wins: int
    ties: int
    losses: int
    confidence: float = 0.95

    @property
    def p_greater(self) -> float:
        """P(s_A > s_B), ties counted in neither (Diffusion-NPO's ``compare_rate.py`` convention)."""
        return self.wins / self.n if self.n else float("nan")

    @property
    def p_less(self) -> float:
        """P(s_A < s_B), ties counted in neither."""
        return self.losses / self.n if self.n else float("nan")

    def to_dict(self) -> dict[str, float | int]:
        out = asdict(self)
        out["p_greater"] = self.p_greater
        out["p_less"] = self.p_less
        return out


@dataclass(frozen=True)
class MeanCI:
    """A statistic (mean by default) of ``n`` values with a bootstrap interval ``[lo, hi]``."""

    value: float
    lo: float
    hi: float
    n: int
    confidence: float = 0.95

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def _as_1d(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if np.isnan(arr).any():
        raise ValueError(f"{name} contains NaN; drop unscored items before computing statistics")
    return arr


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function."""
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    ex = np.exp(x[~pos])
    out[~pos] = ex / (1.0 + ex)
    return out


def bootstrap_ci(
    item_values: Sequence[float] | np.ndarray,
    *,
    statistic: str = "mean",
    groups: Sequence[object] | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float, float]:
    """Percentile bootstrap of ``statistic`` ("mean" or "median") of ``item_values``.

    Returns ``(point_estimate, lo, hi)``. With ``groups`` the resampling unit is the group (all
    items of a resampled group enter together), which is the right unit when several images share
    a prompt. With fewer than two resampling units the interval collapses to the point estimate.
    """
    _check_confidence(confidence)
    values = _as_1d(item_values, "values")
    n = values.size
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    if statistic not in ("mean", "median"):
        raise ValueError(f"statistic must be 'mean' or 'median', got {statistic!r}")
    reduce = np.mean if statistic == "mean" else np.median
    point = float(reduce(values))
    if n_boot <= 0:
        return point, point, point
    rng = np.random.default_rng(seed)
    alpha = (1.0 - confidence) / 2.0

    if groups is None:
        units = n
        if units < 2:
            return point, point, point
        stats = np.empty(n_boot, dtype=np.float64)
        rows = max(1, _CHUNK_ELEMENTS // units)
        for start in range(0, n_boot, rows):
            stop = min(n_boot, start + rows)
            idx = rng.integers(0, units, size=(stop - start, units))
            stats[start:stop] = reduce(values[idx], axis=1)
    else:
        if len(groups) != n:
            raise ValueError(f"groups has {len(groups)} entries but there are {n} values")
        _, inverse = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
        units = int(inverse.max()) + 1
        if units < 2:
            return point, point, point
        if statistic == "mean":
            sums = np.bincount(inverse, weights=values, minlength=units)
            counts = np.bincount(inverse, minlength=units).astype(np.float64)
            stats = np.empty(n_boot, dtype=np.float64)
            rows = max(1, _CHUNK_ELEMENTS // units)
            for start in range(0, n_boot, rows):
                stop = min(n_boot, start + rows)
                idx = rng.integers(0, units, size=(stop - start, units))
                stats[start:stop] = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
        else:
            members = [np.flatnonzero(inverse == g) for g in range(units)]
            stats = np.empty(n_boot, dtype=np.float64)
            for b in range(n_boot):
                pick = rng.integers(0, units, size=units)
                stats[b] = np.median(np.concatenate([values[members[g]] for g in pick]))
    lo, hi = np.quantile(stats, [alpha, 1.0 - alpha])
    return point, float(lo), float(hi)


def bootstrap_mean_ci(
    values: Sequence[float] | np.ndarray,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
    statistic: str = "mean",
    groups: Sequence[object] | None = None,
) -> MeanCI:
    """Mean (or median) of ``values`` with a percentile bootstrap interval."""
    values = _as_1d(values, "values")
    point, lo, hi = bootstrap_ci(
        values, statistic=statistic, groups=groups, n_boot=n_boot, seed=seed, confidence=confidence
    )
    return MeanCI(value=point, lo=lo, hi=hi, n=int(values.size), confidence=confidence)


def _paired(scores_a: Sequence[float], scores_b: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    a = _as_1d(scores_a, "scores_a")
    b = _as_1d(scores_b, "scores_b")
    if a.shape != b.shape:
        raise ValueError(f"paired scores need equal lengths, got {a.size} (A) and {b.size} (B)")
    return a, b


def paired_outcomes(
    scores_a: Sequence[float], scores_b: Sequence[float], tie_tol: float = 0.0
) -> np.ndarray:
    """Per-item outcome for A: 1 (win), 0.5 (tie: ``|a - b| <= tie_tol``), 0 (loss)."""
    a, b = _paired(scores_a, scores_b)
    diff = a - b
    out = np.where(diff > 0, 1.0, 0.0)
    out[np.abs(diff) <= tie_tol] = 0.5
    return out


def paired_win_rate(
    scores_a: Sequence[float],
    scores_b: Sequence[float],
    n_boot: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
    *,
    tie_tol: float = 0.0,
    groups: Sequence[object] | None = None,
) -> WinRate:
    """Win rate of A over B on paired items, ties counted half, with a bootstrap interval.

    ``win_rate = (#[a > b] + 0.5 * #[|a - b| <= tie_tol]) / n``. The interval resamples the pairs
    (or the ``groups`` of pairs) with replacement ``n_boot`` times and takes percentiles.
    """
    outcomes = paired_outcomes(scores_a, scores_b, tie_tol=tie_tol)
    n = int(outcomes.size)
    wins = int((outcomes == 1.0).sum())
    ties = int((outcomes == 0.5).sum())
    losses = n - wins - ties
    point, lo, hi = bootstrap_ci(outcomes, groups=groups, n_boot=n_boot, seed=seed, confidence=confidence)
    return WinRate(
        win_rate=point, lo=lo, hi=hi, n=n, wins=wins, ties=ties, losses=losses, confidence=confidence
    )


def soft_win_probability(
    scores_a: Sequence[float],
    scores_b: Sequence[float],
    *,
    n_boot: int = 0,
    seed: int = 0,
    confidence: float = 0.95,
    groups: Sequence[object] | None = None,
) -> float | MeanCI:
    """Mean of ``sigmoid(s_a - s_b)``: PickScore's two-candidate softmax probability that A is preferred.

    Pass logit-scaled PickScores (``exp(logit_scale) * cos``), not raw cosines. With ``n_boot > 0``
    a :class:`MeanCI` with a bootstrap interval is returned instead of a float.
    """
    a, b = _paired(scores_a, scores_b)
    probs = sigmoid(a - b)
    if n_boot <= 0:
        return float(probs.mean()) if probs.size else float("nan")
    return bootstrap_mean_ci(probs, n_boot=n_boot, seed=seed, confidence=confidence, groups=groups)
