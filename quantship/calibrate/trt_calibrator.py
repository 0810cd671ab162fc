"""TensorRT 10's implicit-int8 calibrators (``IInt8EntropyCalibrator2``, ``IInt8MinMaxCalibrator``) fed by the
same calibration feed as every other calibrator (:class:`quantship.calibrate.feed.FixedBatches`).

The classes derive from TensorRT's own, so they are made on demand from the imported module; GPU buffers come
from cuda-python, or from pycuda when only that is installed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from quantship.calibrate.feed import FixedBatches
from quantship.config import CalibrationMethod
from quantship.cuda import DeviceBuffer, cudart
from quantship.errors import ConfigError, MissingDependencyError
from quantship.fileio import write_bytes_atomic
from quantship.trt_util import import_tensorrt

log = logging.getLogger("quantship.tensorrt")

# TensorRT's implicit-int8 calibrators by our method name.
TRT_CALIBRATORS = {CalibrationMethod.ENTROPY: "IInt8EntropyCalibrator2", CalibrationMethod.MAX: "IInt8MinMaxCalibrator"}


def device_buffer_factory() -> Any:
    """Device buffers from cuda-python, or from pycuda when only that is installed."""
    try:
        cudart()
        return DeviceBuffer
    except MissingDependencyError:
        pass
    try:
        # pycuda has no type information and installs only on GPU machines: the imports the type check cannot resolve.
        import pycuda.autoinit  # noqa: F401  # pyright: ignore[reportMissingImports]
        import pycuda.driver as drv  # pyright: ignore[reportMissingImports]
    except ImportError:
        raise MissingDependencyError(
            "the TensorRT calibrator needs cuda-python (pip install cuda-python) or pycuda"
        ) from None

    class PycudaBuffer:
        def __init__(self, nbytes: int):
            self.nbytes = nbytes
            self._mem = drv.mem_alloc(max(1, nbytes))
            self.ptr = int(self._mem)

        def copy_from(self, array: np.ndarray) -> None:
            drv.memcpy_htod(self._mem, np.ascontiguousarray(array))

        def free(self) -> None:
            self._mem.free()

    return PycudaBuffer


def make_calibrator(method: CalibrationMethod, batches: FixedBatches, cache_path: Path | None) -> Any:
    """An ``IInt8EntropyCalibrator2`` or ``IInt8MinMaxCalibrator`` fed from ``batches`` (TensorRT 10).

    The cache at ``cache_path`` is read back only when it exists; callers decide whether an existing cache
    may be reused (its key must match the weights, data, preprocessing, method and TensorRT version).
    """
    if method not in TRT_CALIBRATORS:
        raise ConfigError(f"TensorRT's implicit int8 has no '{method.value}' calibrator; use entropy or max")
    trt = import_tensorrt()
    # TensorRT 10's calibrator classes (TensorRT 11 has none: plan_build refuses implicit int8 there first).
    bases = {"IInt8EntropyCalibrator2": trt.IInt8EntropyCalibrator2, "IInt8MinMaxCalibrator": trt.IInt8MinMaxCalibrator}
    base = bases[TRT_CALIBRATORS[method]]
    buffer_cls = device_buffer_factory()

    class Calibrator(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            base.__init__(self)
            self._iter = iter(batches)
            self._buffers: dict[str, Any] = {}

        def get_batch_size(self) -> int:
            return batches.batch_size

        def get_batch(self, names: list[str], *args: Any) -> list[int] | None:
            try:
                batch = next(self._iter)
            except StopIteration:
                return None
            ptrs = []
            for name in names:
                array = batch[name]
                buf = self._buffers.get(name)
                if buf is None:
                    buf = self._buffers[name] = buffer_cls(array.nbytes)
                buf.copy_from(array)
                ptrs.append(buf.ptr)
            return ptrs

        def read_calibration_cache(self) -> bytes | None:
            if cache_path is not None and Path(cache_path).is_file():
                log.info("reusing TensorRT calibration cache %s", cache_path)
                return Path(cache_path).read_bytes()
            return None

        def write_calibration_cache(self, cache: Any) -> None:
            if cache_path is not None:
                write_bytes_atomic(cache_path, bytes(cache))

        def free(self) -> None:
            for buf in self._buffers.values():
                buf.free()
            self._buffers.clear()

    return Calibrator()
