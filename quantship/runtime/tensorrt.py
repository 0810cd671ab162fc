"""TensorRT runner: page-locked host buffers, one CUDA stream, async H2D -> execute -> D2H, CUDA-event timings
of the three phases (as trtexec reports them), optional CUDA graph capture."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from quantship import cuda
from quantship.cuda import check, cudart
from quantship.errors import RuntimeBackendError
from quantship.lazy import is_available
from quantship.manifest import manifest_path
from quantship.runtime.base import Runner, RunnerOptions, TensorMeta
from quantship.runtime.registry import RuntimeInfo, register_runtime
from quantship.trt_util import check_engine_compatible, engine_environment, import_tensorrt, make_logger

if TYPE_CHECKING:  # the TensorRT stubs type the engine objects (scripts/typecheck.sh); never imported at run time
    import tensorrt

log = logging.getLogger("quantship.tensorrt")


@dataclass(frozen=True)
class IOTensor:
    """One engine I/O tensor: shape with -1 for dynamic dims, and the largest shape its profile allows."""

    name: str
    is_input: bool
    shape: tuple[int, ...]
    max_shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def max_bytes(self) -> int:
        return int(np.prod(self.max_shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def buffer_plan(tensors: Sequence[IOTensor]) -> dict[str, int]:
    """Bytes to allocate per tensor: enough for the largest shape the engine accepts.

    Raises:
        RuntimeBackendError: An output whose largest shape is still unknown (data-dependent shapes are not
            supported by this runner).
    """
    plan = {}
    for t in tensors:
        if any(d < 0 for d in t.max_shape):
            raise RuntimeBackendError(
                f"tensor '{t.name}' has no upper bound on its shape {t.shape}; data-dependent output shapes are "
                "not supported"
            )
        plan[t.name] = t.max_bytes
    return plan


def output_max_shape(shape: tuple[int, ...], input_batch_max: int) -> tuple[int, ...]:
    """An output's largest shape when only its batch dimension is dynamic."""
    return tuple(input_batch_max if (i == 0 and d < 0) else d for i, d in enumerate(shape))


class TrtRunner(Runner):
    """Runs a serialized TensorRT engine.

    Args:
        path: The ``.engine`` file (its manifest beside it is checked against this machine first).
        cuda_graph: Capture ``execute_async_v3`` in a CUDA graph per input shape and replay it.
        check_manifest: Refuse engines built with another TensorRT version or GPU (recommended).

    After each :meth:`infer`, ``last_timings`` holds ``h2d_ms``, ``compute_ms`` and ``d2h_ms`` from CUDA
    events.
    """

    def __init__(
        self, path: str | Path, name: str | None = None, cuda_graph: bool = False, check_manifest: bool = True
    ):
        super().__init__(name or Path(path).stem)
        self.path = Path(path)
        self.cuda_graph = cuda_graph
        self.check_manifest = check_manifest
        self.last_timings: dict[str, float] = {}
        self._io: list[IOTensor] = []

    def activate_impl(self) -> None:
        trt = import_tensorrt()
        if not self.path.is_file():
            raise RuntimeBackendError(f"TensorRT engine not found: {self.path}")
        env = engine_environment(trt)
        mpath = manifest_path(self.path)
        if self.check_manifest and mpath.is_file():
            check_engine_compatible(json.loads(mpath.read_text()), env, str(self.path))
        self._errors: list[str] = []
        self._logger = make_logger(self._errors)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self._engine is None:
            raise RuntimeBackendError(
                f"{self.path}: TensorRT {trt.__version__} cannot load this engine "
                f"({'; '.join(self._errors[-2:]) or 'not an engine, or built elsewhere'})"
            )
        context = self._engine.create_execution_context()
        if context is None:  # TensorRT returns None when it cannot allocate the context (device memory)
            raise RuntimeBackendError(
                f"{self.path}: TensorRT could not create an execution context ({'; '.join(self._errors[-2:])})"
            )
        self._context: Any = context  # None after deactivate(); _ctx is the checked one
        engine = self._engine
        io = []
        batch_max = 1
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            shape = engine.get_tensor_shape(name)[:]  # Dims -> tuple
            if is_input and any(d < 0 for d in shape):
                max_shape = engine.get_tensor_profile_shape(name, 0)[2][:]
                batch_max = max(batch_max, max_shape[0])
            else:
                max_shape = shape
            io.append(IOTensor(name, is_input, shape, max_shape, np.dtype(trt.nptype(engine.get_tensor_dtype(name)))))
        self._io = [
            t if t.is_input else IOTensor(t.name, False, t.shape, output_max_shape(t.shape, batch_max), t.dtype)
            for t in io
        ]
        sizes = buffer_plan(self._io)
        self._buffers = {t.name: cuda.HostDeviceBuffer(sizes[t.name], t.dtype) for t in self._io}
        for t in self._io:
            self._context.set_tensor_address(t.name, self._buffers[t.name].device)
        self._stream = cuda.Stream()
        self._events = [cuda.Event() for _ in range(4)]
        self._graphs: dict[tuple, Any] = {}

    @property
    def _ctx(self) -> "tensorrt.IExecutionContext":
        """The execution context (infer() runs only on an active runner, which has one)."""
        if self._context is None:
            raise RuntimeBackendError(f"{self.name}: activate() the runner before running it")
        return self._context

    def _launch(self, key: tuple) -> None:
        if not self.cuda_graph:
            if not self._ctx.execute_async_v3(int(self._stream.handle)):
                raise RuntimeBackendError(f"{self.name}: TensorRT execution failed ({'; '.join(self._errors[-2:])})")
            return
        rt = cudart()
        if key not in self._graphs:
            # One plain run first: TensorRT allocates lazily on the first enqueue, which a capture must not see.
            self._ctx.execute_async_v3(int(self._stream.handle))
            self._stream.synchronize()
            check(
                rt.cudaStreamBeginCapture(
                    self._stream.handle, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
                ),
                "cudaStreamBeginCapture",
            )
            self._ctx.execute_async_v3(int(self._stream.handle))
            graph = check(rt.cudaStreamEndCapture(self._stream.handle), "cudaStreamEndCapture")
            self._graphs[key] = (graph, check(rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate"))
        check(rt.cudaGraphLaunch(self._graphs[key][1], self._stream.handle), "cudaGraphLaunch")

    def infer_impl(self, feed: dict[str, np.ndarray], raw: bool) -> dict[str, np.ndarray]:
        rt = cudart()
        h2d, d2h = rt.cudaMemcpyKind.cudaMemcpyHostToDevice, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        key = []
        for t in self._io:
            if not t.is_input:
                continue
            x = np.ascontiguousarray(feed[t.name], dtype=t.dtype)
            buf = self._buffers[t.name]
            if x.nbytes > buf.nbytes:
                raise RuntimeBackendError(
                    f"{self.name}: input '{t.name}' of shape {x.shape} exceeds the engine's profile (largest "
                    f"{t.max_shape})"
                )
            if any(d < 0 for d in t.shape) and not self._ctx.set_input_shape(t.name, x.shape):
                raise RuntimeBackendError(
                    f"{self.name}: shape {x.shape} is outside the engine's profile for '{t.name}' (largest "
                    f"{t.max_shape})"
                )
            buf.host[: x.size] = x.ravel()
            key.append(x.shape)
        start, after_h2d, after_compute, after_d2h = self._events
        # A query's latency runs from handing over the input until the outputs are on the host: H2D, compute
        # and D2H with the stream synchronised (execute_async_v3 alone only enqueues).
        t0 = time.perf_counter()
        start.record(self._stream)
        for t in self._io:
            if t.is_input:
                b = self._buffers[t.name]
                n = int(np.prod(self._ctx.get_tensor_shape(t.name)[:])) * t.dtype.itemsize
                check(
                    rt.cudaMemcpyAsync(b.device, b.host.ctypes.data, n, h2d, self._stream.handle), "cudaMemcpyAsync H2D"
                )
        after_h2d.record(self._stream)
        self._launch(tuple(key))
        after_compute.record(self._stream)
        shapes = {}
        for t in self._io:
            if not t.is_input:
                b = self._buffers[t.name]
                shape = self._ctx.get_tensor_shape(t.name)[:]
                shapes[t.name] = shape
                n = int(np.prod(shape)) * t.dtype.itemsize
                check(
                    rt.cudaMemcpyAsync(b.host.ctypes.data, b.device, n, d2h, self._stream.handle), "cudaMemcpyAsync D2H"
                )
        after_d2h.record(self._stream)
        self._stream.synchronize()
        self._runtime_seconds = time.perf_counter() - t0
        self.last_timings = {
            "h2d_ms": after_h2d.elapsed_ms(start),
            "compute_ms": after_compute.elapsed_ms(after_h2d),
            "d2h_ms": after_d2h.elapsed_ms(after_compute),
        }
        out = {}
        for name, shape in shapes.items():
            b = self._buffers[name]
            y = b.host[: int(np.prod(shape))].reshape(shape).copy()
            out[name] = y if raw or y.dtype == np.float32 else y.astype(np.float32)
        return out

    def deactivate_impl(self) -> None:
        rt = cudart()
        for graph, exec_ in self._graphs.values():
            rt.cudaGraphExecDestroy(exec_)
            rt.cudaGraphDestroy(graph)
        self._graphs.clear()
        for buf in self._buffers.values():
            buf.free()
        for ev in self._events:
            ev.destroy()
        self._stream.destroy()
        self._context = None
        self._engine = None
        self._runtime = None

    def _meta(self, is_input: bool) -> list[TensorMeta]:
        return [
            TensorMeta(t.name, tuple(None if d < 0 else d for d in t.shape), t.dtype)
            for t in self._io
            if t.is_input == is_input
        ]

    def input_metadata_impl(self) -> list[TensorMeta]:
        return self._meta(True)

    def output_metadata_impl(self) -> list[TensorMeta]:
        return self._meta(False)


def _make(source: Any, options: RunnerOptions, name: str | None) -> TrtRunner:
    return TrtRunner(source, name=name, cuda_graph=options.cuda_graph)


register_runtime(
    RuntimeInfo(
        "trt",
        _make,
        suffixes=(".engine", ".plan"),
        timing="cuda-events",
        description="TensorRT engine (NVIDIA GPU)",
        available=lambda: is_available("tensorrt") and (is_available("cuda") or is_available("pycuda")),
        gpu=True,
        distributions=("tensorrt", "cuda-python", "pycuda"),
    )
)
