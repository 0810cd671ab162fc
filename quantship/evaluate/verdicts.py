"""Gate verdicts: a target against its reference on one metric, with an interval over the images.

* A metric that is a mean of per-image 0/1 values (top-1, top-5) gets an exact interval on the paired
  comparison (:mod:`quantship.evaluate.intervals`): it never collapses to a point when no pair disagrees.
* A metric that is not a mean over images (mAP) has no exact interval: it gets a paired percentile bootstrap
  over the images (an image drawn twice counts twice, with its own ground truth), labelled approximate.

Each gate says how it decides (:attr:`quantship.config.Gate.decision`): ``point`` on the point value over the
whole set (as MLPerf judges), ``interval`` on the whole interval (PASS / FAIL / INCONCLUSIVE). A gate over fewer
than ``min_images`` images is INCONCLUSIVE whatever the rule.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from quantship.config import Gate
from quantship.evaluate.intervals import FAIL, INCONCLUSIVE, PASS, decide, paired_verdict
from quantship.evaluate.tasks import PairedSample

MAX_RESAMPLED_METRICS = 200  # resampling a metric that is not a mean (mAP) recomputes it: cap the count


def bootstrap_gate_values(gate: Gate, paired: PairedSample, samples: int, seed: int = 0) -> np.ndarray:
    """The gated quantity (ratio or difference in points) on paired bootstrap resamples of the images."""
    rng = np.random.default_rng(seed)
    n = paired.images
    idx = [rng.integers(0, n, n) for _ in range(min(samples, MAX_RESAMPLED_METRICS))]
    pairs = np.array([paired.resample(i) for i in idx], dtype=np.float64).reshape(-1, 2)
    tb, rb = pairs[:, 0], pairs[:, 1]
    if gate.relative is not None:
        return np.where(rb > 0, tb / np.where(rb > 0, rb, 1.0), np.nan)
    return 100.0 * (tb - rb)


def _bootstrap_images_to_settle(value: float, lo: float, hi: float, threshold: float, n: int) -> int | None:
    """Images that would settle an INCONCLUSIVE bootstrap verdict at the observed value: the interval's
    half-width shrinks as 1 / sqrt(images), so N = n * (half-width / |value - threshold|)^2."""
    gap = abs(value - threshold)
    if not (math.isfinite(value) and math.isfinite(lo) and math.isfinite(hi)) or gap == 0:
        return None
    return max(n, math.ceil(n * ((hi - lo) / 2.0 / gap) ** 2))


def gate_verdict(
    gate: Gate, paired: PairedSample, samples: int = 1000, confidence: float = 0.95, min_images: int = 1
) -> dict[str, Any]:
    """One verdict row: point values, the gated quantity, its interval, the rule and PASS / FAIL / INCONCLUSIVE."""
    value = gate.value(paired.target, paired.reference)
    if paired.per_image is not None:
        t, r = paired.per_image
        exact = paired_verdict(
            t, r, relative=gate.relative, max_drop_points=gate.max_drop_points, confidence=confidence, rule="interval"
        )
        lo, hi, method, settle = exact["ci_low"], exact["ci_high"], "exact", exact["images_to_settle"]
    else:
        stat = bootstrap_gate_values(gate, paired, samples)
        finite = stat[~np.isnan(stat)]
        alpha = (1.0 - confidence) / 2.0
        lo, hi = (
            (float(np.quantile(finite, alpha)), float(np.quantile(finite, 1.0 - alpha)))
            if finite.size
            else (float("nan"), float("nan"))
        )
        method = f"bootstrap, {stat.size} resamples (approximate)"
        settle = None
        if decide(value, lo, hi, gate.threshold, "interval") == INCONCLUSIVE:
            settle = _bootstrap_images_to_settle(value, lo, hi, gate.threshold, paired.images)
    verdict = decide(value, lo, hi, gate.threshold, gate.decision)
    if paired.images < min_images:
        verdict, settle = INCONCLUSIVE, max(min_images, settle or 0)
    return {
        "metric": paired.metric,
        "gate": gate.describe(),
        "kind": gate.kind,
        "rule": gate.decision,
        "reference_value": paired.reference,
        "target_value": paired.target,
        "delta_points": 100.0 * (paired.target - paired.reference),
        "value": value,
        "ci_low": lo,
        "ci_high": hi,
        "confidence": confidence,
        "interval": method,
        "images": paired.images,
        "min_images": min_images,
        "verdict": verdict,
        "passed": verdict == PASS,
        "images_to_settle": settle if verdict == INCONCLUSIVE else None,
    }


__all__ = ["FAIL", "INCONCLUSIVE", "PASS", "bootstrap_gate_values", "gate_verdict"]
