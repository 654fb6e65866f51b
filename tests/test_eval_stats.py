"""Paired win rates, bootstrap intervals and the soft PickScore win probability."""

from __future__ import annotations

import math

import numpy as np
import pytest

from diffusion_po.eval.stats import (
    bootstrap_mean_ci,
    paired_outcomes,
    paired_win_rate,
    sigmoid,
    soft_win_probability,
)


def test_all_wins_gives_one_with_degenerate_interval():
    a = np.arange(10.0) + 1.0
    b = np.arange(10.0)
    wr = paired_win_rate(a, b, n_boot=500, seed=1)
    assert wr.win_rate == 1.0 and (wr.lo, wr.hi) == (1.0, 1.0)
    assert (wr.wins, wr.ties, wr.losses, wr.n) == (10, 0, 0, 10)
    wr_rev = paired_win_rate(b, a, n_boot=500, seed=1)
    assert wr_rev.win_rate == 0.0 and (wr_rev.lo, wr_rev.hi) == (0.0, 0.0)


def test_ties_count_half_and_counts():
    a = [1.0, 2.0, 3.0, 4.0]
    b = [0.0, 2.0, 5.0, 4.0]  # win, tie, loss, tie
    wr = paired_win_rate(a, b, n_boot=0)
    assert (wr.wins, wr.ties, wr.losses) == (1, 2, 1)
    assert wr.win_rate == pytest.approx((1 + 0.5 * 2) / 4)
    assert wr.p_greater == pytest.approx(0.25) and wr.p_less == pytest.approx(0.25)
    assert list(paired_outcomes(a, b)) == [1.0, 0.5, 0.0, 0.5]
    # a tolerance turns near-equal pairs into ties
    assert list(paired_outcomes([1.0, 2.0], [1.05, 1.0], tie_tol=0.1)) == [0.5, 1.0]


def test_symmetric_case_near_half_and_interval_contains_half():
    rng = np.random.default_rng(0)
    a = rng.normal(size=400)
    b = rng.normal(size=400)
    wr = paired_win_rate(a, b, n_boot=1000, seed=0)
    assert abs(wr.win_rate - 0.5) < 0.08
    assert wr.lo < 0.5 < wr.hi
    assert wr.lo <= wr.win_rate <= wr.hi
    # interval width roughly 2 * 1.96 * sqrt(0.25 / n)
    assert (wr.hi - wr.lo) == pytest.approx(2 * 1.96 * math.sqrt(0.25 / 400), rel=0.2)


def test_bootstrap_is_reproducible():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=50), rng.normal(size=50)
    assert paired_win_rate(a, b, seed=7) == paired_win_rate(a, b, seed=7)


def test_mean_ci_matches_normal_theory_and_coverage():
    """Coverage sanity: the 90% interval covers the true mean in roughly 90% of repeated draws."""
    rng = np.random.default_rng(11)
    covered = 0
    trials = 200
    for t in range(trials):
        x = rng.normal(loc=2.0, scale=1.0, size=60)
        ci = bootstrap_mean_ci(x, n_boot=400, seed=t, confidence=0.9)
        assert ci.value == pytest.approx(x.mean())
        covered += ci.lo <= 2.0 <= ci.hi
    assert 0.80 <= covered / trials <= 0.97


def test_median_and_groups():
    x = np.array([1.0, 2.0, 3.0, 100.0, 5.0])
    ci = bootstrap_mean_ci(x, statistic="median", n_boot=200)
    assert ci.value == 3.0 and ci.lo <= 3.0 <= ci.hi
    # groups: two identical items per group -> same point estimate, wider-or-equal interval than
    # treating the duplicated items as independent
    rng = np.random.default_rng(5)
    base = rng.normal(size=40)
    dup = np.repeat(base, 2)
    groups = np.repeat(np.arange(40), 2)
    naive = bootstrap_mean_ci(dup, n_boot=1000, seed=0)
    clustered = bootstrap_mean_ci(dup, n_boot=1000, seed=0, groups=groups)
    assert clustered.value == pytest.approx(naive.value)
    assert (clustered.hi - clustered.lo) > 1.2 * (naive.hi - naive.lo)
    clustered_median = bootstrap_mean_ci(dup, n_boot=100, seed=0, groups=groups, statistic="median")
    assert clustered_median.value == pytest.approx(np.median(dup))


def test_soft_win_probability_formula():
    a = np.array([21.0, 20.0, 22.5])
    b = np.array([20.0, 20.0, 21.0])
    expected = np.mean([1 / (1 + math.exp(-1.0)), 0.5, 1 / (1 + math.exp(-1.5))])
    assert soft_win_probability(a, b) == pytest.approx(expected)
    assert soft_win_probability(a, b) + soft_win_probability(b, a) == pytest.approx(1.0)
    ci = soft_win_probability(a, b, n_boot=200)
    assert ci.value == pytest.approx(expected) and ci.lo <= expected <= ci.hi
    # stable for large differences
    assert sigmoid(np.array([-1000.0, 1000.0])).tolist() == [0.0, 1.0]


def test_bad_inputs():
    with pytest.raises(ValueError, match="equal lengths"):
        paired_win_rate([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        paired_win_rate([1.0, float("nan")], [1.0, 2.0])
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_mean_ci([1.0, 2.0], confidence=1.5)
    empty = paired_win_rate([], [])
    assert empty.n == 0 and math.isnan(empty.win_rate)
