"""Exact (guaranteed-coverage) intervals for paired accuracy comparisons, and gate verdicts built on them.

Why not the bootstrap: a target and its reference are scored on the same images. With few images, or with a
target that agrees with its reference on every image, the percentile bootstrap of the paired difference
collapses to [0, 0] and "proves" equality from nine images. The true disagreement rate can be large while
nine images happen to show none (Clopper-Pearson's 95% upper bound for 0 disagreements in 9 is 0.336).
The intervals here never do that: their coverage is at least the nominal confidence for every true value
and every n, which the tests check by enumerating every outcome for small n.

Notation, per image: ``t`` (target correct) and ``r`` (reference correct), 0/1, paired.

* ``b`` images where only the target is right (t=1, r=0), ``c`` where only the reference is (t=0, r=1),
  ``n`` images, ``k`` images the reference gets right.
* acc_t - acc_r = (b - c) / n estimates delta = p_b - p_c.
* pi = p_b + p_c is the discordant (disagreement) rate; theta = p_b / pi is the share of disagreements the
  target wins, so delta = pi * (2 * theta - 1).

Method (difference, :func:`paired_diff_interval`): a Bonferroni combination of two Clopper-Pearson
intervals. The discordant count m = b + c is Binomial(n, pi); given m, b is Binomial(m, theta) (McNemar's
conditioning). Spend ``rate_share * alpha`` on a two-sided Clopper-Pearson interval [pi_lo, pi_hi] for pi
and the rest on one for theta from b of m ([0, 1] when m = 0). The conditional interval for theta covers
with probability >= its level for every m, hence also unconditionally, so by the union bound both cover
together with probability >= 1 - alpha. The interval for delta is the range of pi * (2 theta - 1) over that
rectangle, which is exact (conservative) and has a closed form:

    lo = (pi_lo if 2 theta_lo - 1 >= 0 else pi_hi) * (2 theta_lo - 1)
    hi = (pi_hi if 2 theta_hi - 1 >= 0 else pi_lo) * (2 theta_hi - 1)

That rectangle bound alone is not monotone: going from b = 0 to b = 1..3 target wins lowers its lower bound
(m grows, so pi_hi grows, while theta_lo stays near 0). The lower bound used is therefore the minimum of
the rectangle bound over outcomes (b', c) with b' >= b (and the upper bound, by symmetry, the maximum over
c' >= c). A minimum over a set that contains the observed outcome is never above its own bound, so
coverage is kept; it is nondecreasing in b by construction, and swapping b and c negates the interval.
Cost: at b = c = 0 the bound widens from -4.4/n to -6.3/n at large n (-0.39 to -0.52 at n = 9); for
b >= 3 or so nothing changes.

Conservativeness (measured by enumerating every outcome for n <= 30 over a 0.01 grid of (p_b, p_c)): the
coverage of the 95% interval is never below 0.975, median 0.998, i.e. the price of a guarantee from
Bonferroni and Clopper-Pearson. Exact unconditional intervals (test inversion maximised over the nuisance
rate) would be tighter at small n, but cost O(n) to O(n^2) per evaluation of a p-value.

Why this one: (1) it is exact by construction, for every n, not just asymptotically; (2) it keeps the
uncertainty of the disagreement rate that the conditional (McNemar / Clopper-Pearson-on-b-of-m) interval
drops: with b = c = 0 the conditional interval is degenerate, ours is +-0.52 at n = 9; (3) it is a few beta
quantiles, so it costs about the same at n = 9 and at n = 50 000; (4) its price at large n is
moderate: theta is estimated at level 1 - alpha/2 (z 2.24 instead of 1.96) and the rectangle adds the pi and
theta parts linearly; at ImageNet scale (n = 50 000, b = 500, c = 700) the 95% interval is [-0.59, -0.23]
points against the normal-theory [-0.54, -0.26], a third wider, but with guaranteed coverage.
The simpler Bonferroni of marginal bounds (lo = CP_lo(b) - CP_hi(c)) is also exact but adds the two
standard deviations instead of their variances (up to sqrt(2) wider), so it was not chosen.

Ratio (relative gates, :func:`paired_ratio_interval`): acc_t / acc_r = 1 + delta / acc_r. A further
``ref_share * alpha`` buys a Clopper-Pearson interval [a_lo, a_hi] for acc_r (k ~ Binomial(n, acc_r));
delta gets the rest. On the event that both cover (probability >= 1 - alpha, union bound again):

    lo = max(0, 1 + delta_lo / (a_lo if delta_lo < 0 else a_hi))     (0 when delta_lo < 0 and a_lo = 0)
    hi = min(1 / a_lo, 1 + delta_hi / (a_lo if delta_hi > 0 else a_hi))  (inf when a_lo = 0)

(1 / a_lo because acc_t <= 1.) ``ref_share`` defaults to 0.1: the reference accuracy only scales delta, a
second-order effect, so spending most of alpha on delta gives tighter ratio bounds.

Verdicts (:func:`decide`): gates are "higher is better": a value clears a gate when value >= threshold.
For a drop gate the value is target - reference in points and the threshold is -max_drop_points; for a
relative gate the value is the ratio and the threshold the required factor.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import numpy as np

PASS, FAIL, INCONCLUSIVE = "PASS", "FAIL", "INCONCLUSIVE"
RULES = ("point", "interval")


# --------------------------------------------------------------------------------------- Clopper-Pearson


def cp_lower(x: float, n: float, alpha: float) -> float:
    """One-sided Clopper-Pearson lower bound for a binomial proportion: P(bound > p) <= alpha.

    ``x`` may be fractional (used for projections at scaled counts); x <= 0 gives 0."""
    from scipy.special import betaincinv  # lazy: ~0.35 s to import, only when an interval is computed

    if n <= 0 or x <= 0:
        return 0.0
    x = min(x, n)
    return float(betaincinv(x, n - x + 1.0, alpha))


def cp_upper(x: float, n: float, alpha: float) -> float:
    """One-sided Clopper-Pearson upper bound for a binomial proportion: P(bound < p) <= alpha; x >= n gives 1."""
    from scipy.special import betaincinv  # lazy: ~0.35 s to import, only when an interval is computed

    if n <= 0 or x >= n:
        return 1.0
    x = max(x, 0.0)
    return float(betaincinv(x + 1.0, n - x, 1.0 - alpha))


def clopper_pearson(x: float, n: float, confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided exact (Clopper-Pearson) interval for a binomial proportion x/n; [0, 1] when n = 0."""
    alpha = 1.0 - confidence
    return cp_lower(x, n, alpha / 2), cp_upper(x, n, alpha / 2)


# ----------------------------------------------------------------------------------------- paired counts


class PairedCounts(NamedTuple):
    """What a paired gate rests on: b = target-only right, c = reference-only right, n images, k = reference right
    (fractional when scaled to another number of images)."""

    b: float
    c: float
    n: float
    k: float


def paired_counts(target: np.ndarray, reference: np.ndarray) -> PairedCounts:
    """(b, c, n, k) from per-image 0/1 correctness of the same images: b = target-only right, c =
    reference-only right, n images, k = reference right."""
    t = np.asarray(target).astype(bool).ravel()
    r = np.asarray(reference).astype(bool).ravel()
    if t.shape != r.shape:
        raise ValueError(f"paired counts need the same images: {t.size} vs {r.size}")
    return PairedCounts(int(np.sum(t & ~r)), int(np.sum(~t & r)), int(t.size), int(r.sum()))


def _check(b: float, c: float, n: float, confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if b < 0 or c < 0 or b + c > n * (1 + 1e-12):
        raise ValueError(f"need 0 <= b, c and b + c <= n, got b={b}, c={c}, n={n}")


def _rectangle_lower(b: np.ndarray, c: np.ndarray, n: float, a_rate: float, a_split: float) -> np.ndarray:
    """Lower end of the range of pi * (2 theta - 1) over the Clopper-Pearson rectangle (vectorised)."""
    from scipy.special import betaincinv  # lazy: ~0.35 s to import, only when an interval is computed

    b, c = np.asarray(b, np.float64), np.asarray(c, np.float64)
    m = b + c
    with np.errstate(divide="ignore", invalid="ignore"):
        pi_lo = np.where(m > 0, betaincinv(np.maximum(m, 1e-300), n - m + 1.0, a_rate / 2), 0.0)
        pi_hi = np.where(m < n, betaincinv(m + 1.0, np.maximum(n - m, 1e-300), 1.0 - a_rate / 2), 1.0)
        th_lo = np.where(b > 0, betaincinv(np.maximum(b, 1e-300), c + 1.0, a_split / 2), 0.0)
    s = 2.0 * np.where(m > 0, th_lo, 0.0) - 1.0
    return np.where(s >= 0, pi_lo, pi_hi) * s


def _lower(b: float, c: float, n: float, a_rate: float, a_split: float) -> float:
    """Monotone lower bound: min of the rectangle bound over outcomes b' >= b with the same c (b' <= n - c).

    The rectangle bound alone dips as b grows from 0 to ~3 (one more target win raises the disagreement
    rate's upper bound more than it moves theta's lower bound). The minimum over b' >= b is <= the bound
    at b, so coverage is kept, and it is nondecreasing in b by construction. The rectangle bound falls and
    then rises in b', so the search walks windows to the right until the bound turns up."""
    best = float(_rectangle_lower(np.asarray([b]), np.asarray([c]), n, a_rate, a_split)[0])
    start, width = 0, 8
    top = n - c - b  # b' = b + j, j <= top
    while start < top:
        j = np.arange(start + 1, min(start + width, top) + 1, dtype=np.float64)
        vals = _rectangle_lower(b + j, np.full(j.size, c, np.float64), n, a_rate, a_split)
        best = min(best, float(vals.min()))
        if vals[-1] > best:
            break
        start, width = start + width, 2 * width
    return best


def paired_diff_interval(
    b: float, c: float, n: float, confidence: float = 0.95, rate_share: float = 0.5
) -> tuple[float, float]:
    """Exact interval for acc_target - acc_reference (a fraction in [-1, 1]) from paired counts.

    ``b``: images only the target gets right; ``c``: only the reference; ``n``: images. Coverage >= confidence
    for every true (p_b, p_c) and n (Bonferroni of Clopper-Pearson for the disagreement rate, with
    ``rate_share`` of alpha, and for the target's share of the disagreements; see the module docstring),
    made monotone (lower bound nondecreasing in b and nonincreasing in c, upper bound likewise) by taking
    the lower bound's minimum over b' >= b and the upper bound's maximum over c' >= c, which only widens it.
    Symmetric: swapping b and c negates the interval. Counts may be fractional (projections); n = 0 gives
    (-1, 1)."""
    _check(b, c, n, confidence)
    if not 0.0 < rate_share < 1.0:
        raise ValueError(f"rate_share must be in (0, 1), got {rate_share}")
    if n <= 0:
        return -1.0, 1.0
    alpha = 1.0 - confidence
    a_rate, a_split = rate_share * alpha, (1.0 - rate_share) * alpha
    return _lower(b, c, n, a_rate, a_split), -_lower(c, b, n, a_rate, a_split)


def paired_ratio_interval(
    b: float, c: float, n: float, k: float, confidence: float = 0.95, ref_share: float = 0.1, rate_share: float = 0.5
) -> tuple[float, float]:
    """Exact interval for acc_target / acc_reference from paired counts; ``k`` = images the reference gets
    right. ``ref_share`` of alpha goes to a Clopper-Pearson interval for acc_reference, the rest to
    :func:`paired_diff_interval`; bounds as in the module docstring (0 .. inf when acc_reference may be 0)."""
    _check(b, c, n, confidence)
    if not 0.0 < ref_share < 1.0:
        raise ValueError(f"ref_share must be in (0, 1), got {ref_share}")
    if not (c <= k <= n - b + 1e-9 * max(n, 1)):
        raise ValueError(f"reference-right count k={k} is inconsistent with b={b}, c={c}, n={n}")
    if n <= 0:
        return 0.0, math.inf
    alpha = 1.0 - confidence
    d_lo, d_hi = paired_diff_interval(b, c, n, 1.0 - (1.0 - ref_share) * alpha, rate_share)
    a_lo, a_hi = cp_lower(k, n, ref_share * alpha / 2), cp_upper(k, n, ref_share * alpha / 2)
    if d_lo < 0:
        lo = 1.0 + d_lo / a_lo if a_lo > 0 else 0.0
    else:
        lo = 1.0 + d_lo / a_hi
    if a_lo <= 0:
        hi = math.inf
    else:
        hi = min(1.0 / a_lo, 1.0 + d_hi / (a_lo if d_hi > 0 else a_hi))
    return float(max(0.0, lo)), float(hi)


# ---------------------------------------------------------------------------------------------- verdicts


def decide(point_value: float, ci_low: float, ci_high: float, threshold: float, rule: str = "interval") -> str:
    """Verdict of a "higher is better" gate (clears when value >= threshold).

    rule 'point': PASS iff the point value clears the gate, else FAIL (a nan point value FAILs: it cannot be
    shown to clear). rule 'interval': PASS when the whole interval clears (ci_low >= threshold), FAIL when it
    entirely misses it (ci_high < threshold), INCONCLUSIVE otherwise (and when a bound is nan)."""
    if rule == "point":
        return PASS if point_value >= threshold else FAIL  # nan compares False: FAIL
    if rule != "interval":
        raise ValueError(f"rule must be one of {RULES}, got '{rule}'")
    if ci_low >= threshold:
        return PASS
    if ci_high < threshold:
        return FAIL
    return INCONCLUSIVE


def _gate_interval(kind: str, b: float, c: float, n: float, k: float, confidence: float) -> tuple[float, float]:
    """The interval in the gate's units: points (x100) for 'drop', the ratio for 'relative'."""
    if kind == "drop":
        lo, hi = paired_diff_interval(b, c, n, confidence)
        return 100.0 * lo, 100.0 * hi
    if kind == "relative":
        return paired_ratio_interval(b, c, n, k, confidence)
    raise ValueError(f"gate kind must be 'drop' or 'relative', got '{kind}'")


def images_to_settle(
    counts: PairedCounts,
    threshold: float,
    kind: str = "drop",
    confidence: float = 0.95,
    max_images: int = 10**9,
) -> int | None:
    """Estimated total number of images that would settle an INCONCLUSIVE interval verdict.

    Method: keep the observed proportions b/n, c/n, k/n fixed, scale the counts to N images (fractional
    counts are fine for the beta quantiles) and find the smallest N >= n at which the interval in the
    gate's units (points for kind='drop' with threshold = -max_drop_points; the ratio for kind='relative'
    with threshold = the factor) lies entirely on one side of the threshold. Search: doubling from n, then
    bisection (the interval shrinks monotonically with N at fixed proportions). Returns n when already
    settled, None when it never settles (point estimate exactly at the threshold, no images, or more than
    ``max_images`` needed). A planning figure, not a promise: it assumes the observed rates are the true
    ones, so with the true rates at these values about as many runs would settle later as earlier."""
    b, c, n, k = counts
    if n <= 0:
        return None
    point = (100.0 * (b - c) / n) if kind == "drop" else ((k + b - c) / k if k > 0 else float("nan"))

    def settled(size: float) -> bool:
        f = size / n
        lo, hi = _gate_interval(kind, b * f, c * f, size, k * f, confidence)
        return decide(point, lo, hi, threshold) != INCONCLUSIVE

    if settled(n):
        return n
    if not math.isfinite(point) or point == threshold:
        return None
    return smallest_settling_size(n, settled, max_images)


def smallest_settling_size(n: int, settled: Callable[[float], bool], max_images: int = 10**9) -> int | None:
    """Smallest N >= n at which ``settled(N)`` holds (it must be monotone in N): doubling from n, then bisection;
    None when more than ``max_images`` would be needed."""
    if settled(n):
        return n
    lo_n, hi_n = n, 2 * n
    while not settled(hi_n):
        lo_n, hi_n = hi_n, 2 * hi_n
        if lo_n > max_images:
            return None
    while hi_n - lo_n > 1:
        mid = (lo_n + hi_n) // 2
        if settled(mid):
            hi_n = mid
        else:
            lo_n = mid
    return hi_n if hi_n <= max_images else None


def paired_verdict(
    target: np.ndarray,
    reference: np.ndarray,
    *,
    relative: float | None = None,
    max_drop_points: float | None = None,
    confidence: float = 0.95,
    rule: str = "interval",
) -> dict[str, Any]:
    """One gate on paired per-image 0/1 correctness: value, exact interval, verdict and (for an
    INCONCLUSIVE verdict) the estimated images that would settle it.

    Exactly one of ``relative`` (value = acc_t / acc_r, threshold = relative) and ``max_drop_points``
    (value = 100 * (acc_t - acc_r) in points, threshold = -max_drop_points) is given, as in config.Gate."""
    if (relative is None) == (max_drop_points is None):
        raise ValueError("give exactly one of 'relative' and 'max_drop_points'")
    counts = paired_counts(target, reference)
    b, c, n, k = counts
    kind = "relative" if relative is not None else "drop"
    threshold = float(relative) if relative is not None else -float(max_drop_points)
    if n == 0:
        value, lo, hi = float("nan"), float("nan"), float("nan")
    else:
        value = (100.0 * (b - c) / n) if kind == "drop" else ((k + b - c) / k if k > 0 else float("nan"))
        lo, hi = _gate_interval(kind, b, c, n, k, confidence)
    verdict = decide(value, lo, hi, threshold, rule)
    return {
        "kind": kind,
        "value": value,
        "ci_low": lo,
        "ci_high": hi,
        "threshold": threshold,
        "confidence": confidence,
        "rule": rule,
        "verdict": verdict,
        "images": n,
        "target_only_right": b,
        "reference_only_right": c,
        "reference_right": k,
        "images_to_settle": images_to_settle(counts, threshold, kind, confidence)
        if decide(value, lo, hi, threshold) == INCONCLUSIVE
        else None,
        "method": "exact: Bonferroni of Clopper-Pearson intervals (disagreement rate x split)",
    }
