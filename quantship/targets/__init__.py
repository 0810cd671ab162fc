"""Evaluation targets by name: how each one's artifact is built; its runner comes from the runtime registry.

A target is ``backend-precision[-method]`` (``tflite-int8``, ``keras-fp32``, ``qdq-int8-entropy``). This layer
sits below the jobs and above the converters, calibrators and runtimes: it is the only place that knows which
converter makes which target. Everything about one backend is found from its module:

- :mod:`~quantship.targets.base`: the registry (:func:`register_target`, :func:`get_target`,
  :func:`parse_targets`), :class:`Target`, :class:`BuildContext`.
- :mod:`~quantship.targets.keras`: ``keras-fp32`` (the reference).
- :mod:`~quantship.targets.tflite`: ``tflite-*`` (the converter's precisions and ``tflite-int8-<method>``).
- :mod:`~quantship.targets.onnx`: ``onnx-fp32`` and ``qdq-int8-<method>`` (TensorRT's Q/DQ placement).
- :mod:`~quantship.targets.ort_int8`: ``ort-int8-<method>`` (ONNX Runtime's CPU int8 layout).
- :mod:`~quantship.targets.tensorrt`: ``trt-*`` (and the list of every TensorRT module).
- :mod:`~quantship.targets.calibrated`: the export / statistics / ranges steps the calibrated targets share.
- :mod:`~quantship.targets.run`: building and evaluating a run's targets on one dataset (model loading,
  calibration images, rows).

Adding a runtime means registering the runtime (``quantship.runtime.registry``) and its targets from its own
module here (or from any module, with :func:`register_target`).
"""

from __future__ import annotations

from quantship.targets.base import (
    DEFAULT_TARGETS,
    DEFAULT_UNNAMED_METHOD,
    IO_SUFFIXES,
    QUANTIZED_WEIGHTS,
    BuildContext,
    CalibrationData,
    Target,
    get_target,
    list_targets,
    needs_calibration,
    parse_targets,
    register_alias,
    register_target,
    unregister_target,
)

# The backend modules register their targets on import, in this order (the order `quantship targets` lists them).
# isort: off
from quantship.targets import keras  # noqa: E402, F401
from quantship.targets import tflite  # noqa: E402, F401
from quantship.targets import onnx  # noqa: E402, F401
from quantship.targets import ort_int8  # noqa: E402, F401
from quantship.targets import tensorrt  # noqa: E402, F401
# isort: on

__all__ = [
    "DEFAULT_TARGETS",
    "DEFAULT_UNNAMED_METHOD",
    "IO_SUFFIXES",
    "QUANTIZED_WEIGHTS",
    "BuildContext",
    "CalibrationData",
    "Target",
    "get_target",
    "list_targets",
    "needs_calibration",
    "parse_targets",
    "register_alias",
    "register_target",
    "unregister_target",
]
