"""Bootstrap confidence intervals for accuracy figures and paired accuracy differences."""

from __future__ import annotations

import numpy as np


def bootstrap_mean_ci(
    values: np.ndarray, samples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of per-image values (e.g. 0/1 correctness)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, values.size, size=(samples, values.size))
    means = values[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1.0 - alpha))


def bootstrap_diff_ci(
    target: np.ndarray, reference: np.ndarray, samples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Interval of mean(target) - mean(reference), resampling images (paired: the same images for both)."""
    target, reference = np.asarray(target, np.float64), np.asarray(reference, np.float64)
    if target.shape != reference.shape:
        raise ValueError(f"paired bootstrap needs the same images: {target.shape} vs {reference.shape}")
    return bootstrap_mean_ci(target - reference, samples, confidence, seed)
