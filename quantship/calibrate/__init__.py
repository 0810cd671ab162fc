"""Calibration: the feed, activation statistics, calibrators (max, entropy, percentile, mse, auto), the
int8 arithmetic the rewrites share, TensorRT cache I/O and TensorRT calibrator classes.

The public names, by module (imported on first use, so importing one module never loads its siblings):

- :mod:`~quantship.calibrate.api`: CalibrationResult, calibrate
- :mod:`~quantship.calibrate.calibrators`: Calibrator, AutoCalibrator, get_calibrator, compute_ranges
- :mod:`~quantship.calibrate.collector`: StatisticsCollector
- :mod:`~quantship.calibrate.histogram`: TensorStats
- :mod:`~quantship.calibrate.feed`: FixedBatches
- :mod:`~quantship.calibrate.int8`: INT8_MAX, quantize_weight
- :mod:`~quantship.calibrate.trt_cache`: CalibrationCache, DEFAULT_TRT_VERSION, read_cache, write_cache
- :mod:`~quantship.calibrate.trt_calibrator`: make_calibrator, TRT_CALIBRATORS
"""

from __future__ import annotations

from quantship.lazy import public_attributes

_PUBLIC = {
    "AutoCalibrator": "quantship.calibrate.calibrators",
    "CalibrationCache": "quantship.calibrate.trt_cache",
    "CalibrationResult": "quantship.calibrate.api",
    "Calibrator": "quantship.calibrate.calibrators",
    "DEFAULT_TRT_VERSION": "quantship.calibrate.trt_cache",
    "FixedBatches": "quantship.calibrate.feed",
    "INT8_MAX": "quantship.calibrate.int8",
    "StatisticsCollector": "quantship.calibrate.collector",
    "TRT_CALIBRATORS": "quantship.calibrate.trt_calibrator",
    "TensorStats": "quantship.calibrate.histogram",
    "calibrate": "quantship.calibrate.api",
    "compute_ranges": "quantship.calibrate.calibrators",
    "get_calibrator": "quantship.calibrate.calibrators",
    "make_calibrator": "quantship.calibrate.trt_calibrator",
    "quantize_weight": "quantship.calibrate.int8",
    "read_cache": "quantship.calibrate.trt_cache",
    "write_cache": "quantship.calibrate.trt_cache",
}
__all__ = sorted(_PUBLIC)
__getattr__ = public_attributes(__name__, _PUBLIC)
