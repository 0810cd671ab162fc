"""Calibration thresholds on known distributions, against straightforward implementations written here."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from scipy.stats import entropy as kl_divergence

from quantship.calibrate.calibrators import get_calibrator
from quantship.calibrate.histogram import TensorStats
from quantship.errors import CalibrationError, ConfigError

# ----------------------------------------------------------------- independent reference implementations


def reference_histogram(batches, num_bins=2048):
    """np.histogram of |x| on the first batch's range, extended by whole bins (pytorch-quantization's way)."""
    hist = edges = None
    for x in batches:
        a = np.abs(x).astype(np.float32).ravel()
        if hist is None:
            hist, edges = np.histogram(a, bins=num_bins, range=(0, a.max()))
            continue
        if a.max() > edges[-1]:
            width = edges[1] - edges[0]
            n_new = int(np.ceil(a.max() / width)) - (len(edges) - 1)
            edges = np.concatenate([edges, edges[-1] + width * np.arange(1, n_new + 1)])
        h, edges = np.histogram(a, bins=edges)
        h[: len(hist)] += hist
        hist = h
    return hist, edges


def reference_entropy_amax(hist, edges, num_quantized_bins=128, start=128):
    """TensorRT's entropy calibration, loop by loop (as in pytorch-quantization's _compute_amax_entropy)."""
    bins = hist.astype(np.float64).copy()
    bins[0] = bins[1]
    divergences, arguments = [], []
    for i in range(start, len(bins) + 1):
        space = np.linspace(0, i, num=num_quantized_bins + 1)
        digitized = np.digitize(range(i), space) - 1
        digitized[bins[:i] == 0] = -1
        # pytorch-quantization's three Python loops over the bins, as bincounts (the same sums in the same order:
        # the loops cost 18 s of CPU over the four distributions, these 8 s).
        kept = digitized != -1
        q_counts = np.bincount(digitized[kept], weights=bins[:i][kept], minlength=num_quantized_bins)
        members = np.bincount(digitized[kept], minlength=num_quantized_bins)
        q_counts[members > 0] /= members[members > 0]
        q = np.zeros(i)
        q[kept] = q_counts[digitized[kept]]
        p = bins[:i].copy()
        p[-1] += bins[i:].sum()
        divergences.append(kl_divergence(p / p.sum(), q / q.sum()))
        arguments.append(i)
    divergences = np.asarray(divergences)
    last_argmin = len(divergences) - 1 - np.argmin(divergences[::-1])
    return edges[arguments[last_argmin]]


def reference_percentile_amax(hist, edges, p):
    cdf = np.cumsum(hist / hist.sum())
    return edges[np.searchsorted(cdf, p / 100)]


def reference_mse_amax(hist, edges, start=128):
    centers = (edges[1:] + edges[:-1]) / 2
    best = None
    for i in range(start, len(centers)):
        scale = centers[i] / 127
        q = np.clip(np.round(centers / scale), -128, 127) * scale
        mse = ((q - centers) ** 2 * hist).mean()
        if best is None or mse < best[0]:
            best = (mse, centers[i])
    return best[1]


# ------------------------------------------------------------------------------------------ the data


def _batches(kind, n_batches=4, size=20000, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for b in range(n_batches):
        if kind == "gaussian":
            x = rng.normal(0, 1, size)
        elif kind == "laplace":
            x = rng.laplace(0, 1, size)
        elif kind == "outliers":
            x = rng.normal(0, 1, size)
            x[rng.integers(0, size)] = rng.choice([-1, 1]) * (40 + 20 * b)  # one outlier a batch; range grows
        elif kind == "relu":
            x = np.maximum(rng.normal(0.2, 1, size), 0)
        out.append(x.astype(np.float32))
    return out


def _stats(batches):
    s = TensorStats("t")
    for x in batches:
        s.update(x)
    return s


DISTRIBUTIONS = ["gaussian", "laplace", "outliers", "relu"]


@pytest.mark.parametrize("kind", DISTRIBUTIONS)
def test_histogram_matches_reference(kind):
    batches = _batches(kind)
    s = _stats(batches)
    hist, edges = reference_histogram(batches)
    assert len(s.counts) == len(hist)
    np.testing.assert_allclose(s.edges, edges, rtol=1e-6)
    # Values that sit exactly on a bin edge may land one bin apart (float32 vs float64 division).
    assert np.abs(s.counts - hist).sum() <= 4
    assert s.counts.sum() == sum(b.size for b in batches)
    assert s.amax == max(np.abs(b).max() for b in batches)


@pytest.mark.parametrize("kind", DISTRIBUTIONS)
def test_entropy_matches_reference(kind):
    s = _stats(_batches(kind, n_batches=2))
    ref = reference_entropy_amax(s.counts, s.edges)
    assert get_calibrator("entropy").compute_amax(s) == pytest.approx(ref, rel=1e-9)


@pytest.mark.parametrize("kind", DISTRIBUTIONS)
@pytest.mark.parametrize("p", [99.0, 99.9, 99.99])
def test_percentile_matches_reference(kind, p):
    s = _stats(_batches(kind))
    assert get_calibrator("percentile", percentile=p).compute_amax(s) == pytest.approx(
        reference_percentile_amax(s.counts, s.edges, p), rel=1e-9
    )


@pytest.mark.parametrize("kind", DISTRIBUTIONS)
def test_mse_matches_reference(kind):
    s = _stats(_batches(kind))
    assert get_calibrator("mse").compute_amax(s) == pytest.approx(reference_mse_amax(s.counts, s.edges), rel=1e-9)


def test_max_is_the_absolute_maximum():
    batches = _batches("outliers")
    assert get_calibrator("max").compute_amax(_stats(batches)) == max(float(np.abs(b).max()) for b in batches)


def test_methods_order_on_outliers():
    """With rare outliers max keeps them; entropy and the 99.99th percentile clip them. MSE weighs the squared
    error of the few outliers against the rounding noise of the bulk, so it clips less (but still clips)."""
    s = _stats(_batches("outliers"))
    amax = {m: get_calibrator(m).compute_amax(s) for m in ("max", "entropy", "percentile", "mse")}
    assert amax["max"] >= 100
    for m in ("entropy", "percentile"):
        assert 2.0 < amax[m] < 20.0, (m, amax[m])
    assert amax["entropy"] < amax["mse"] < amax["max"]


def test_gaussian_entropy_threshold_in_known_range():
    """Published: TensorRT-style entropy calibration clips a unit Gaussian at a few sigma."""
    s = _stats(_batches("gaussian", n_batches=8, size=50000))
    assert 2.5 < get_calibrator("entropy").compute_amax(s) < 4.8


def test_nan_is_named_and_all_zero_tensor_has_no_range():
    s = TensorStats("conv1/out")
    with pytest.raises(CalibrationError, match="conv1/out.*NaN"):
        s.update(np.array([1.0, np.nan], np.float32))
    z = TensorStats("zeros")
    z.update(np.zeros(100, np.float32))
    assert get_calibrator("entropy").compute_amax(z) == 0.0
    z.update(np.array([0.0, 2.0], np.float32))
    assert z.counts[0] == 101  # the zeros seen before the range was known are kept


def test_unknown_method():
    with pytest.raises(ConfigError, match="unknown calibration method 'kl'"):
        get_calibrator("kl")


def test_collector_memory_does_not_grow_with_batches():
    """Statistics of 10 vs 200 batches hold the same memory (the histogram, not the data)."""

    def peak(n_batches):
        s = TensorStats("t")
        rng = np.random.default_rng(0)
        tracemalloc.start()
        for _ in range(n_batches):
            s.update(rng.normal(0, 1, 4096).astype(np.float32))
        snapshot = tracemalloc.take_snapshot()
        tracemalloc.stop()
        return s.nbytes(), sum(st.size for st in snapshot.statistics("filename"))

    small, big = peak(10), peak(200)
    assert small[0] == big[0]
    assert big[1] < small[1] + 64 * 1024
