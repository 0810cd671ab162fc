"""Calibrators: from one tensor's statistics to the range ``amax`` that int8 maps to 127.

Each method is a class behind one interface, picked by name: ``max``, ``entropy`` (TensorRT's
KL-divergence search), ``percentile`` and ``mse``. All read the same :class:`TensorStats`, so one
statistics pass serves every method.
"""

from __future__ import annotations

import abc
from typing import Any

import numpy as np

from quantship.calibrate.histogram import TensorStats
from quantship.config import CalibrationMethod
from quantship.errors import ConfigError

INT8_MAX = 127


class Calibrator(abc.ABC):
    """Computes ``amax`` (> 0) for a tensor; scale = amax / 127."""

    name: str = ""
    trt_algorithm: str | None = None  # name in a TensorRT calibration cache header

    def compute_amax(self, stats: TensorStats) -> float:
        if stats.counts is None or stats.amax == 0.0:
            return 0.0  # an all-zero tensor: callers keep it in float (no usable scale)
        amax = float(self._amax(stats))
        # A threshold of zero (e.g. 99.99 % of the mass in the first bin) would give scale 0: keep one bin.
        return max(amax, stats.width)

    @abc.abstractmethod
    def _amax(self, stats: TensorStats) -> float: ...

    def describe(self) -> dict[str, Any]:
        return {"method": self.name}


class MaxCalibrator(Calibrator):
    """amax = max |x| over all calibration data (TensorRT's MinMaxCalibrator)."""

    name = "max"
    trt_algorithm = "MinMaxCalibration"

    def _amax(self, stats: TensorStats) -> float:
        return stats.amax


class PercentileCalibrator(Calibrator):
    """amax = the given percentile of |x| (the left edge of the bin where the CDF first reaches it)."""

    name = "percentile"

    def __init__(self, percentile: float = 99.99):
        if not 0.0 < percentile <= 100.0:
            raise ConfigError(f"percentile must be in (0, 100], got {percentile}")
        self.percentile = percentile

    def _amax(self, stats: TensorStats) -> float:
        counts = stats.counts
        cdf = np.cumsum(counts / counts.sum())
        idx = int(np.searchsorted(cdf, self.percentile / 100.0))
        return float(stats.edges[min(idx, len(counts))])

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "percentile": self.percentile}


class MseCalibrator(Calibrator):
    """amax among the bin centres (from bin ``start_bin`` on) minimising the int8 quantization MSE."""

    name = "mse"

    def __init__(self, start_bin: int = 128, stride: int = 1):
        self.start_bin, self.stride = start_bin, stride

    def _amax(self, stats: TensorStats) -> float:
        counts = stats.counts.astype(np.float64)
        centers = (np.arange(len(counts), dtype=np.float64) + 0.5) * stats.width
        candidates = np.arange(min(self.start_bin, len(counts) - 1), len(counts), self.stride)
        # Empty bins add nothing: sum over the others only (a grown histogram's tail is mostly empty).
        nz = counts > 0
        values, weights = centers[nz], counts[nz]
        best, best_i = np.inf, candidates[-1]
        for chunk in np.array_split(candidates, max(1, len(candidates) // 256)):
            scale = centers[chunk][:, None] / INT8_MAX
            q = np.clip(np.round(values[None, :] / scale), -INT8_MAX - 1, INT8_MAX) * scale
            mse = ((q - values[None, :]) ** 2 * weights[None, :]).sum(axis=1) / len(counts)
            j = int(np.argmin(mse))
            if mse[j] < best:
                best, best_i = mse[j], chunk[j]
        return float(centers[best_i])


class EntropyCalibrator(Calibrator):
    """TensorRT's entropy calibration (IInt8EntropyCalibrator2), vectorised.

    For every candidate ``i`` in ``start..nbins``: P = the first ``i`` bins with the mass beyond them added
    to bin ``i-1``; Q = the first ``i`` bins merged into 128 groups and spread evenly over the non-zero bins
    of each group; choose the ``i`` minimising KL(P || Q) (the last one on ties); amax = i * bin width.
    The count of the first bin is replaced by the second's first (zeros after ReLU would dominate).

    KL(P||Q) = (1/T) [sum P log P - sum P log Q] + log(S_i / T), with T the total count and S_i the mass of
    the first ``i`` bins; sum P log Q reduces to per-group terms, so every candidate costs O(128) with
    prefix sums instead of O(nbins).
    """

    name = "entropy"
    trt_algorithm = "EntropyCalibration2"

    def __init__(self, num_quantized_bins: int = 128, start_bin: int = 128):
        self.num_quantized_bins = num_quantized_bins
        self.start_bin = start_bin

    def _amax(self, stats: TensorStats) -> float:
        bins = stats.counts.astype(np.float64).copy()
        if len(bins) < 2:
            return stats.amax
        bins[0] = bins[1]
        n, m = len(bins), self.num_quantized_bins
        start = min(self.start_bin, n)
        total = bins.sum()
        i = np.arange(start, n + 1)  # candidate cut points
        csum = np.concatenate([[0.0], np.cumsum(bins)])
        cnz = np.concatenate([[0], np.cumsum(bins > 0)])
        with np.errstate(divide="ignore", invalid="ignore"):
            blogb = np.where(bins > 0, bins * np.log(np.where(bins > 0, bins, 1.0)), 0.0)
        cblogb = np.concatenate([[0.0], np.cumsum(blogb)])
        tail = total - csum[i]
        last = bins[i - 1]
        p_last = last + tail
        # sum_j P_j log P_j: bins before i-1 unchanged, bin i-1 carries the tail.
        with np.errstate(divide="ignore", invalid="ignore"):
            plogp = cblogb[i - 1] + np.where(p_last > 0, p_last * np.log(np.where(p_last > 0, p_last, 1.0)), 0.0)
        # Group g of candidate i covers bins [ceil(g*i/m), ceil((g+1)*i/m)).
        g = np.arange(m + 1)
        bounds = (g[None, :] * i[:, None] + (m - 1)) // m
        gsum = csum[bounds[:, 1:]] - csum[bounds[:, :-1]]
        gnz = cnz[bounds[:, 1:]] - cnz[bounds[:, :-1]]
        with np.errstate(divide="ignore", invalid="ignore"):
            per_group = np.where(gsum > 0, gsum * np.log(np.where(gsum > 0, gsum, 1.0) / np.maximum(gnz, 1)), 0.0)
            plogq = per_group.sum(axis=1)
            # Bin i-1 carries the tail on the P side; on the Q side it holds its group's average.
            q_last = np.where(last > 0, gsum[:, -1] / np.maximum(gnz[:, -1], 1), 0.0)
            plogq += np.where(tail > 0, tail * np.log(np.where(q_last > 0, q_last, 1.0)), 0.0)
            s = csum[i]
            kl = (plogp - plogq) / total + np.log(s / total)
        # P has mass where Q has none (empty bin i-1, non-empty tail): infinite divergence.
        kl = np.where((tail > 0) & (last == 0), np.inf, kl)
        kl = np.where(s > 0, kl, np.inf)
        best = len(kl) - 1 - int(np.argmin(kl[::-1]))
        return float(i[best] * stats.width)

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "num_quantized_bins": self.num_quantized_bins, "start_bin": self.start_bin}


AUTO_CANDIDATES = (
    CalibrationMethod.MAX,
    CalibrationMethod.ENTROPY,
    CalibrationMethod.PERCENTILE,
    CalibrationMethod.MSE,
)


class AutoCalibrator(Calibrator):
    """The per-layer choice among :data:`AUTO_CANDIDATES` (see :mod:`quantship.calibrate.auto`): it needs the
    model and calibration images, not one tensor's statistics, so :func:`quantship.calibrate.api.calibrate`
    computes its ranges; this object records the choice in results and manifests."""

    name = "auto"
    trt_algorithm = None

    def __init__(self, chosen: dict[str, str] | None = None, percentile: float | None = None):
        self.chosen = dict(chosen or {})
        self.percentile = percentile

    def _amax(self, stats: Any) -> float:
        raise ConfigError("the auto method chooses per tensor from the model's outputs: use calibrate.api.calibrate")

    def describe(self) -> dict[str, Any]:
        counts = {m.value: sum(1 for v in self.chosen.values() if v == m.value) for m in AUTO_CANDIDATES}
        return {
            "method": self.name,
            "candidates": [m.value for m in AUTO_CANDIDATES],
            "percentile": self.percentile,
            "chosen_counts": counts,
            "chosen": dict(sorted(self.chosen.items())),
        }


CALIBRATORS: dict[CalibrationMethod, type[Calibrator]] = {
    CalibrationMethod.MAX: MaxCalibrator,
    CalibrationMethod.ENTROPY: EntropyCalibrator,
    CalibrationMethod.PERCENTILE: PercentileCalibrator,
    CalibrationMethod.MSE: MseCalibrator,
}


def get_calibrator(method: CalibrationMethod | str, percentile: float | None = None) -> Calibrator:
    """Instantiate a calibrator (``max``, ``entropy``, ``percentile``, ``mse``); ``percentile`` applies to the
    percentile method only."""
    method = CalibrationMethod.parse(method)
    if method is CalibrationMethod.AUTO:
        return AutoCalibrator(percentile=percentile)
    if method not in CALIBRATORS:
        raise ConfigError(
            f"no calibrator for method '{method.value}'; choose one of: {', '.join(m.value for m in CALIBRATORS)}"
        )
    if method is CalibrationMethod.PERCENTILE and percentile is not None:
        return PercentileCalibrator(percentile=float(percentile))
    return CALIBRATORS[method]()


def compute_ranges(stats: dict[str, TensorStats], calibrator: Calibrator) -> dict[str, float]:
    """amax per tensor (tensors that were all zeros are left out: they have no usable scale)."""
    out = {}
    for name, s in stats.items():
        amax = calibrator.compute_amax(s)
        if amax > 0:
            out[name] = amax
    return out
