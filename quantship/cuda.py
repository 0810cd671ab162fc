"""Thin CUDA helpers over cuda-python (``cuda.bindings.runtime``, or ``cuda.cudart`` before 12.6):
error checking with readable messages, pinned host and device buffers, streams and events.

Imported only by the TensorRT modules; nothing here runs at import time.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from quantship.errors import MissingDependencyError, RuntimeBackendError


def cudart() -> Any:
    """The CUDA runtime bindings of cuda-python."""
    try:
        # cuda-python ships compiled modules without type information (and only on GPU machines): the one import
        # the type check cannot resolve.
        from cuda.bindings import runtime  # pyright: ignore[reportMissingImports]  # cuda-python >= 12.6

        return runtime
    except ImportError:
        pass
    try:
        from cuda import cudart as runtime  # type: ignore[no-redef]  # pyright: ignore[reportMissingImports]  # < 12.6

        return runtime
    except ImportError as exc:
        raise MissingDependencyError(
            f"cuda-python is not installed ({exc}); it provides the GPU buffers for TensorRT: pip install cuda-python"
        ) from None


def _error_text(rt: Any, err: Any) -> str:
    try:
        _, name = rt.cudaGetErrorName(err)
        _, text = rt.cudaGetErrorString(err)
        name, text = (v.decode() if isinstance(v, bytes) else v for v in (name, text))
        return f"{name}: {text}"
    except Exception:  # noqa: BLE001
        return str(err)


def check(result: Any, what: str) -> Any:
    """Unpack a cuda-python ``(err, value...)`` tuple, raising a readable error when ``err`` is not success."""
    rt = cudart()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != rt.cudaError_t.cudaSuccess:
        hint = ""
        if err == getattr(rt.cudaError_t, "cudaErrorInsufficientDriver", None):
            hint = (
                f" (the NVIDIA driver is older than the CUDA runtime: driver {driver_version()}, runtime "
                f"{runtime_version()}; update the driver or use a matching cuda-python)"
            )
        elif err in (
            getattr(rt.cudaError_t, "cudaErrorNoDevice", None),
            getattr(rt.cudaError_t, "cudaErrorInitializationError", None),
        ):
            hint = " (no usable NVIDIA GPU: is the driver loaded and the device visible, e.g. docker run --gpus all?)"
        raise RuntimeBackendError(f"CUDA error in {what}: {_error_text(rt, err)}{hint}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _version(fn_name: str) -> str:
    rt = cudart()
    try:
        err, v = getattr(rt, fn_name)()
    except Exception:  # noqa: BLE001
        return "unknown"
    if err != rt.cudaError_t.cudaSuccess:
        return "unknown"
    return f"{v // 1000}.{(v % 1000) // 10}" if v else "none"


def driver_version() -> str:
    return _version("cudaDriverGetVersion")


def runtime_version() -> str:
    return _version("cudaRuntimeGetVersion")


def device_info(device: int = 0) -> dict[str, Any]:
    """Name and compute capability of a GPU; raises a clear error when there is none."""
    rt = cudart()
    count = check(rt.cudaGetDeviceCount(), "cudaGetDeviceCount")
    if not count:
        raise RuntimeBackendError("no NVIDIA GPU found (cudaGetDeviceCount returned 0)")
    prop = check(rt.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = prop.name.decode(errors="replace").rstrip("\x00") if isinstance(prop.name, bytes) else str(prop.name)
    return {
        "gpu": name,
        "compute_capability": f"{prop.major}.{prop.minor}",
        "driver": driver_version(),
        "cuda_runtime": runtime_version(),
    }


class HostDeviceBuffer:
    """A page-locked host array and a device allocation of the same size."""

    def __init__(self, nbytes: int, dtype: np.dtype):
        rt = cudart()
        self.dtype = np.dtype(dtype)
        self.nbytes = int(nbytes)
        count = max(1, self.nbytes // self.dtype.itemsize)
        self._host_ptr = check(rt.cudaMallocHost(max(1, self.nbytes)), "cudaMallocHost")
        ctype = np.ctypeslib.as_ctypes_type(self.dtype) if self.dtype != np.float16 else ctypes.c_uint16
        host = np.ctypeslib.as_array(ctypes.cast(self._host_ptr, ctypes.POINTER(ctype)), (count,))
        self.host = host.view(self.dtype) if self.dtype == np.float16 else host
        self.device = int(check(rt.cudaMalloc(max(1, self.nbytes)), "cudaMalloc"))

    def free(self) -> None:
        rt = cudart()
        if self.device:
            check(rt.cudaFree(self.device), "cudaFree")
            self.device = 0
        if self._host_ptr:
            check(rt.cudaFreeHost(self._host_ptr), "cudaFreeHost")
            self._host_ptr = 0


class DeviceBuffer:
    """A device allocation, for calibrator batches."""

    def __init__(self, nbytes: int):
        self.nbytes = int(nbytes)
        self.ptr = int(check(cudart().cudaMalloc(max(1, self.nbytes)), "cudaMalloc"))

    def copy_from(self, array: np.ndarray) -> None:
        rt = cudart()
        array = np.ascontiguousarray(array)
        if array.nbytes > self.nbytes:
            raise RuntimeBackendError(f"batch of {array.nbytes} bytes does not fit a {self.nbytes}-byte device buffer")
        check(
            rt.cudaMemcpy(self.ptr, array.ctypes.data, array.nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice),
            "cudaMemcpy",
        )

    def free(self) -> None:
        if self.ptr:
            check(cudart().cudaFree(self.ptr), "cudaFree")
            self.ptr = 0


class Stream:
    def __init__(self):
        self.handle: Any = check(cudart().cudaStreamCreate(), "cudaStreamCreate")  # None once destroyed

    def synchronize(self) -> None:
        check(cudart().cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")

    def destroy(self) -> None:
        if self.handle is not None:
            check(cudart().cudaStreamDestroy(self.handle), "cudaStreamDestroy")
            self.handle = None


class Event:
    def __init__(self):
        self.handle: Any = check(cudart().cudaEventCreate(), "cudaEventCreate")  # None once destroyed

    def record(self, stream: Stream) -> None:
        check(cudart().cudaEventRecord(self.handle, stream.handle), "cudaEventRecord")

    def elapsed_ms(self, start: "Event") -> float:
        return float(check(cudart().cudaEventElapsedTime(start.handle, self.handle), "cudaEventElapsedTime"))

    def destroy(self) -> None:
        if self.handle is not None:
            check(cudart().cudaEventDestroy(self.handle), "cudaEventDestroy")
            self.handle = None
