"""Exact paired intervals: coverage checked against every outcome of small experiments, plus verdicts."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import gammaln

from quantship.evaluate.intervals import (
    FAIL,
    INCONCLUSIVE,
    PASS,
    PairedCounts,
    clopper_pearson,
    decide,
    images_to_settle,
    paired_counts,
    paired_diff_interval,
    paired_ratio_interval,
    paired_verdict,
)

TOL = 1e-12  # floating-point slack on "the bound contains the true value"


def _diff_grid(step: float = 0.02) -> tuple[np.ndarray, np.ndarray]:
    g = np.round(np.arange(0.0, 1.0 + step / 2, step), 10)
    pb, pc = np.meshgrid(g, g, indexing="ij")
    keep = pb + pc <= 1.0 + 1e-12
    return pb[keep], pc[keep]


def diff_coverage(n: int, confidence: float, pb: np.ndarray, pc: np.ndarray) -> np.ndarray:
    """Exact coverage probability of paired_diff_interval at every (p_b, p_c), by enumerating all (b, c)."""
    outcomes = [(b, c) for b in range(n + 1) for c in range(n + 1 - b)]
    cover = np.zeros(pb.size)
    p0 = np.clip(1.0 - pb - pc, 0.0, 1.0)
    delta = pb - pc
    for b, c in outcomes:
        lo, hi = paired_diff_interval(b, c, n, confidence)
        logc = gammaln(n + 1) - gammaln(b + 1) - gammaln(c + 1) - gammaln(n - b - c + 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            prob = np.exp(
                logc
                + np.where(b, b * np.log(pb), 0.0)
                + np.where(c, c * np.log(pc), 0.0)
                + np.where(n - b - c, (n - b - c) * np.log(p0), 0.0)
            )
        prob = np.nan_to_num(prob)
        cover += prob * ((lo - TOL <= delta) & (delta <= hi + TOL))
    return cover


@pytest.mark.parametrize("confidence", [0.95, 0.8])
def test_difference_interval_covers_for_every_true_rate_and_small_n(confidence):
    pb, pc = _diff_grid()
    rng = np.random.default_rng(0)  # plus off-grid points
    u = rng.dirichlet([1, 1, 1], 300)
    pb, pc = np.concatenate([pb, u[:, 0]]), np.concatenate([pc, u[:, 1]])
    worst = min(diff_coverage(n, confidence, pb, pc).min() for n in range(1, 13))
    assert worst >= confidence - 1e-9, worst


def test_conditional_interval_alone_would_undercover():
    """Sanity of the brute force: McNemar-style Clopper-Pearson on b of m, scaled by the observed m/n,
    ignores the uncertainty in m and falls below nominal somewhere; the same enumeration catches it."""
    n, pb, pc = 9, np.array([0.15]), np.array([0.0])
    cover = 0.0
    for b in range(n + 1):
        for c in range(n + 1 - b):
            m = b + c
            th_lo, th_hi = clopper_pearson(b, m) if m else (0.5, 0.5)
            lo, hi = (m / n) * (2 * th_lo - 1), (m / n) * (2 * th_hi - 1)
            prob = math.comb(n, b) * math.comb(n - b, c) * pb[0] ** b * pc[0] ** c * (1 - pb[0] - pc[0]) ** (n - b - c)
            cover += prob * (lo - TOL <= pb[0] - pc[0] <= hi + TOL)
    assert cover < 0.95
    assert diff_coverage(n, 0.95, pb, pc)[0] >= 0.95


def test_ratio_interval_covers_the_true_ratio():
    g = np.round(np.arange(0.0, 1.0 + 1e-9, 0.05), 10)
    p11, pb, pc = (a.ravel() for a in np.meshgrid(g, g, g, indexing="ij"))
    keep = (p11 + pb + pc <= 1.0 + 1e-12) & (p11 + pc > 0)
    p11, pb, pc = p11[keep], pb[keep], pc[keep]
    p00 = np.clip(1.0 - p11 - pb - pc, 0.0, 1.0)
    ratio = (p11 + pb) / (p11 + pc)
    worst = 1.0
    for n in (1, 2, 3, 5, 8, 10):
        cover = np.zeros(p11.size)
        for n11 in range(n + 1):
            for b in range(n + 1 - n11):
                for c in range(n + 1 - n11 - b):
                    n00 = n - n11 - b - c
                    lo, hi = paired_ratio_interval(b, c, n, n11 + c)
                    logc = gammaln(n + 1) - gammaln(n11 + 1) - gammaln(b + 1) - gammaln(c + 1) - gammaln(n00 + 1)
                    with np.errstate(divide="ignore", invalid="ignore"):
                        lp = logc + sum(
                            np.where(k, k * np.log(p), 0.0) for k, p in ((n11, p11), (b, pb), (c, pc), (n00, p00))
                        )
                    cover += np.nan_to_num(np.exp(lp)) * ((lo - TOL <= ratio) & (ratio <= hi * (1 + TOL) + TOL))
        worst = min(worst, cover.min())
    assert worst >= 0.95 - 1e-9, worst


def test_nine_images_in_full_agreement_do_not_prove_equality():
    lo, hi = paired_diff_interval(0, 0, 9)
    cp_hi = clopper_pearson(0, 9)[1]
    assert cp_hi == pytest.approx(0.3363, abs=1e-4)
    # The disagreement rate may be ~0.34-0.39 and all of it could go either way: a symmetric interval.
    assert lo <= -cp_hi and lo == pytest.approx(-hi) and hi >= cp_hi
    v = paired_verdict(np.ones(9), np.ones(9), max_drop_points=1.0)
    assert v["verdict"] == INCONCLUSIVE and v["ci_low"] < -30 and v["images_to_settle"] > 9
    assert paired_verdict(np.ones(9), np.ones(9), max_drop_points=1.0, rule="point")["verdict"] == PASS


def test_intervals_are_monotone_and_shrink_with_more_images():
    n = 40
    for c in (0, 3, 10):
        bounds = np.array([paired_diff_interval(b, c, n) for b in range(n - c + 1)])
        assert np.all(np.diff(bounds[:, 0]) >= -1e-12) and np.all(np.diff(bounds[:, 1]) >= -1e-12)
    for b in (0, 3, 10):
        bounds = np.array([paired_diff_interval(b, c, n) for c in range(n - b + 1)])
        assert np.all(np.diff(bounds[:, 0]) <= 1e-12) and np.all(np.diff(bounds[:, 1]) <= 1e-12)
    widths = [np.subtract(*paired_diff_interval(2 * f, 5 * f, 100 * f)[::-1]) for f in (1, 2, 4, 8, 16)]
    assert np.all(np.diff(widths) < 0)
    for b in range(8):  # the point estimate is always inside
        for c in range(8 - b):
            lo, hi = paired_diff_interval(b, c, 10)
            assert lo <= (b - c) / 10 <= hi
            rlo, rhi = paired_ratio_interval(b, c, 10, c + 2)
            assert rlo <= (2 + b) / (2 + c) <= rhi
    ratios = np.array([paired_ratio_interval(b, 5, 200, 150) for b in range(40)])
    assert np.all(np.diff(ratios, axis=0) >= -1e-12)


def test_large_n_interval_is_close_to_the_normal_one():
    b, c, n = 500, 700, 50_000
    lo, hi = paired_diff_interval(b, c, n)
    d = (b - c) / n
    se = math.sqrt(((b + c) / n - d * d) / n)
    assert lo < d - 1.96 * se and hi > d + 1.96 * se  # conservative ...
    assert (hi - lo) < 1.5 * 2 * 1.96 * se  # ... by a bounded factor


def test_decide_rules():
    assert decide(0.5, 0.1, 0.9, 0.0, "interval") == PASS
    assert decide(-0.5, -0.9, -0.1, 0.0, "interval") == FAIL
    assert decide(0.5, -0.1, 0.9, 0.0, "interval") == INCONCLUSIVE
    assert decide(0.0, 0.0, 0.5, 0.0, "interval") == PASS  # at the threshold clears (value >= threshold)
    assert decide(0.5, -0.1, 0.9, 0.0, "point") == PASS and decide(-0.1, -0.5, 0.9, 0.0, "point") == FAIL
    assert decide(float("nan"), float("nan"), float("nan"), 0.0, "interval") == INCONCLUSIVE
    assert decide(float("nan"), 0.0, 0.0, 0.0, "point") == FAIL
    with pytest.raises(ValueError):
        decide(0, 0, 0, 0, "bogus")


def test_images_to_settle_is_the_first_size_that_settles():
    # All agree on 9 images, gate "drop <= 1 point": the interval must shrink inside [-1, +1] points.
    n_star = images_to_settle(PairedCounts(0, 0, 9, 9), -1.0, "drop")
    assert 100 * paired_diff_interval(0, 0, n_star)[0] >= -1.0 > 100 * paired_diff_interval(0, 0, n_star - 1)[0]
    assert 400 < n_star < 800
    # Observed drop of 0.5 points at 2000 images, gate 1 point: needs more images, same proportions.
    b, c, n, k = 20, 30, 2000, 1500
    assert decide(-0.5, *[100 * v for v in paired_diff_interval(b, c, n)], -1.0) == INCONCLUSIVE
    need = images_to_settle(PairedCounts(b, c, n, k), -1.0, "drop")
    f = need / n
    assert 100 * paired_diff_interval(b * f, c * f, need)[0] >= -1.0
    f = (need - 1) / n
    assert 100 * paired_diff_interval(b * f, c * f, need - 1)[0] < -1.0
    # Relative gate.
    need_r = images_to_settle(PairedCounts(b, c, n, k), 0.98, "relative")
    f = need_r / n
    assert need_r > n and paired_ratio_interval(b * f, c * f, need_r, k * f)[0] >= 0.98
    assert images_to_settle(PairedCounts(b, c, n, k), -0.5, "drop") is None  # point exactly at the gate: never
    assert images_to_settle(PairedCounts(0, 300, 1000, 800), -1.0, "drop") == 1000  # already a clear FAIL


def test_paired_counts_and_verdict():
    rng = np.random.default_rng(1)
    r = rng.random(500) < 0.8
    t = r.copy()
    t[np.flatnonzero(r)[:40]] = False  # 8 points worse
    assert paired_counts(t, r) == (0, 40, 500, int(r.sum()))
    v = paired_verdict(t, r, max_drop_points=1.0)
    assert (
        v["verdict"] == FAIL
        and v["value"] == pytest.approx(-8.0)
        and v["ci_high"] < -1.0
        and v["images_to_settle"] is None
    )
    v = paired_verdict(t, r, relative=0.5)
    assert v["verdict"] == PASS and v["ci_low"] <= v["value"] <= v["ci_high"]
    with pytest.raises(ValueError):
        paired_verdict(t, r)
    with pytest.raises(ValueError):
        paired_counts(t, r[:-1])
