"""Gate verdicts: a target against its reference on one metric, with an interval over the images."""

from __future__ import annotations

from typing import Any

import numpy as np

from quantship.config import Gate
from quantship.evaluate.tasks import PairedSample

MAX_RESAMPLED_METRICS = 200  # resampling a metric that is not a mean (mAP) recomputes it: cap the count


def bootstrap_gate_values(gate: Gate, paired: PairedSample, samples: int, seed: int = 0) -> np.ndarray:
    """The gated quantity (ratio or difference in points) on paired bootstrap resamples of the images."""
    rng = np.random.default_rng(seed)
    n = paired.images
    if paired.per_image is not None:
        t, r = paired.per_image
        idx = rng.integers(0, n, size=(samples, n))
        tb, rb = t[idx].mean(axis=1), r[idx].mean(axis=1)
    else:
        idx = [rng.integers(0, n, n) for _ in range(min(samples, MAX_RESAMPLED_METRICS))]
        pairs = np.array([paired.resample(i) for i in idx], dtype=np.float64).reshape(-1, 2)
        tb, rb = pairs[:, 0], pairs[:, 1]
    if gate.relative is not None:
        return np.where(rb > 0, tb / np.where(rb > 0, rb, 1.0), np.nan)
    return 100.0 * (tb - rb)


def gate_verdict(gate: Gate, paired: PairedSample, samples: int = 1000, confidence: float = 0.95) -> dict[str, Any]:
    """One verdict row: point values, the gated quantity, its interval and PASS/FAIL."""
    value = gate.value(paired.target, paired.reference)
    stat = bootstrap_gate_values(gate, paired, samples)
    alpha = (1.0 - confidence) / 2.0
    finite = stat[~np.isnan(stat)]
    lo, hi = (
        (float(np.quantile(finite, alpha)), float(np.quantile(finite, 1.0 - alpha)))
        if finite.size
        else (float("nan"), float("nan"))
    )
    return {
        "metric": paired.metric,
        "gate": gate.describe(),
        "kind": gate.kind,
        "reference_value": paired.reference,
        "target_value": paired.target,
        "delta_points": 100.0 * (paired.target - paired.reference),
        "value": value,
        "ci_low": lo,
        "ci_high": hi,
        "confidence": confidence,
        "images": paired.images,
        "passed": gate.evaluate(paired.target, paired.reference),
    }
