"""Ranges from one statistics pass: every calibrator's, and the per-tensor ``auto`` choice; the documents they
make (ranges JSON, TensorRT cache). The statistics pass over the tensors the Q/DQ layouts read, and the Q/DQ
models written from the ranges, are graph rewrites: :mod:`quantship.convert.calibrated`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from quantship.calibrate.auto import CANDIDATES, choose_ranges
from quantship.calibrate.calibrators import AutoCalibrator, Calibrator, compute_ranges, get_calibrator
from quantship.calibrate.collector import StatisticsCollector
from quantship.calibrate.histogram import TensorStats
from quantship.calibrate.trt_cache import DEFAULT_TRT_VERSION, CalibrationCache
from quantship.config import CalibrationMethod


@dataclass
class CalibrationResult:
    """Statistics of one pass and what a calibrator made of them."""

    stats: dict[str, TensorStats]
    calibrator: Calibrator
    amax: dict[str, float]
    images: int

    def ranges_document(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """The ranges as a JSON document other tools can read."""
        return {
            "format": "quantship-ranges-v1",
            "calibrator": self.calibrator.describe(),
            "images": self.images,
            "quantization": {"type": "int8", "symmetric": True, "scale": "amax / 127", "zero_point": 0},
            "tensors": {
                name: {**self.stats[name].to_dict(), "calibrated_amax": amax, "scale": amax / 127.0}
                for name, amax in self.amax.items()
            },
            **(extra or {}),
        }

    def trt_cache(self, version: str = DEFAULT_TRT_VERSION) -> CalibrationCache:
        algo = self.calibrator.trt_algorithm
        if algo is None:
            # TensorRT has no percentile / MSE calibrator; the cache still carries the scales, labelled as
            # entropy so that TensorRT 10 reads them (it checks the algorithm name of the header).
            algo = "EntropyCalibration2"
        return CalibrationCache.from_amax(self.amax, algo, version)


def calibrate(
    collector: StatisticsCollector, method: CalibrationMethod | str, percentile: float | None = None
) -> CalibrationResult:
    """Ranges by ``method`` from the collector's statistics (``auto``: per tensor, the method with the smallest
    output error on the calibration images the collector kept)."""
    cal = get_calibrator(method, percentile=percentile)
    if isinstance(cal, AutoCalibrator):
        per_method = {m: _ranges(collector, get_calibrator(m, percentile=percentile)) for m in CANDIDATES}
        choice = choose_ranges(
            collector.model, collector.stats, collector.sample, percentile, collector.threads, per_method=per_method
        )
        cal = AutoCalibrator(choice.chosen, percentile)
        return CalibrationResult(collector.stats, cal, choice.amax, collector.images)
    return CalibrationResult(collector.stats, cal, _ranges(collector, cal), collector.images)


def _ranges(collector: StatisticsCollector, cal: Calibrator) -> dict[str, float]:
    """Ranges of one calibrator, computed once per collector (the auto method needs every method's)."""
    cache = collector.__dict__.setdefault("_ranges", {})
    key = repr(sorted(cal.describe().items()))
    if key not in cache:
        cache[key] = compute_ranges(collector.stats, cal)
    return dict(cache[key])
