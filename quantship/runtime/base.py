"""The one Runner interface every runtime implements (after Polygraphy's BaseRunner)."""

from __future__ import annotations

import abc
import logging
import time
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from quantship.errors import RuntimeBackendError

log = logging.getLogger("quantship")


@dataclass(frozen=True)
class RunnerOptions:
    """How a runner runs its artifact; each runtime reads the fields that concern it.

    Attributes:
        threads: CPU threads (LiteRT, ONNX Runtime); None: the runtime's default.
        providers: ONNX Runtime execution providers in priority order (``cpu``, ``cuda``, ``tensorrt`` or
            full names).
        session_config: ONNX Runtime session configuration entries, e.g.
            ``(("session.disable_quant_qdq", "1"),)``.
        cuda_graph: TensorRT: replay ``execute_async_v3`` through a captured CUDA graph.
    """

    threads: int | None = None
    providers: tuple[str, ...] = ("cpu",)
    session_config: tuple[tuple[str, str], ...] = ()
    cuda_graph: bool = False


@dataclass(frozen=True)
class TensorMeta:
    """Name, shape (None for a dynamic dimension), dtype and int quantization of one input/output."""

    name: str
    shape: tuple[int | None, ...]
    dtype: np.dtype
    scale: float | None = None
    zero_point: int | None = None

    @property
    def quantized(self) -> bool:
        return self.scale is not None and np.dtype(self.dtype).kind in "iu"

    def describe(self) -> str:
        dims = ", ".join("N" if d is None else str(d) for d in self.shape)
        q = f", scale={self.scale:.6g}, zero_point={self.zero_point}" if self.quantized else ""
        return f"{self.name}: ({dims}) {np.dtype(self.dtype).name}{q}"


def quantize(x: np.ndarray, meta: TensorMeta) -> np.ndarray:
    """Float -> the tensor's integer type with its scale and zero point (round half to even, clipped)."""
    info = np.iinfo(meta.dtype)
    q = np.round(x / meta.scale) + meta.zero_point
    return np.clip(q, info.min, info.max).astype(meta.dtype)


def dequantize(q: np.ndarray, meta: TensorMeta) -> np.ndarray:
    return ((q.astype(np.float32) - np.float32(meta.zero_point)) * np.float32(meta.scale)).astype(np.float32)


class Runner(abc.ABC):
    """Loads one artifact and runs it: ``activate()``, ``infer(feed)``, ``deactivate()``.

    Callers feed and receive float32 arrays; a runner whose model has integer I/O (de)quantizes inside,
    unless ``raw=True`` is passed to :meth:`infer`.

    Two times are recorded by every :meth:`infer`, in seconds:

    * ``last_query_time``: the whole call, from handing over the input until the outputs are back on the
      host as the caller receives them, the runner's own work included (feed checks, integer
      (de)quantization, host-device copies). This is what an application pays per query and what MLPerf
      LoadGen measures around a system under test: the latency ``bench`` reports.
    * ``last_inference_time``: the runtime's call alone (``invoke``, ``session.run``; TensorRT: H2D + compute
      + D2H with the stream synchronised), timed by the runner with :meth:`_time_runtime`; the whole call
      when a runner does not time its runtime separately.
    """

    def __init__(self, name: str):
        self.name = name
        self.is_active = False
        self.last_query_time: float | None = None
        self.last_inference_time: float | None = None
        self._runtime_seconds: float | None = None

    def _time_runtime(self, fn, *args, **kwargs):
        """Call the runtime and record how long the call alone took."""
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        self._runtime_seconds = time.perf_counter() - start
        return result

    # -- hooks --------------------------------------------------------------------------------------
    @abc.abstractmethod
    def activate_impl(self) -> None: ...

    @abc.abstractmethod
    def infer_impl(self, feed: dict[str, np.ndarray], raw: bool) -> dict[str, np.ndarray]: ...

    def deactivate_impl(self) -> None:
        pass

    @abc.abstractmethod
    def input_metadata_impl(self) -> list[TensorMeta]: ...

    @abc.abstractmethod
    def output_metadata_impl(self) -> list[TensorMeta]: ...

    # -- public -------------------------------------------------------------------------------------
    def activate(self) -> "Runner":
        if self.is_active:
            log.warning("%s: activate() called on an active runner; ignored", self.name)
            return self
        self.activate_impl()
        self.is_active = True
        return self

    def _require_active(self, what: str) -> None:
        if not self.is_active:
            raise RuntimeBackendError(f"{self.name}: activate() the runner before {what}")

    def input_metadata(self) -> list[TensorMeta]:
        """Name, shape, dtype and quantization of each input (the runner must be active)."""
        self._require_active("asking for its metadata")
        return self.input_metadata_impl()

    def output_metadata(self) -> list[TensorMeta]:
        """Name, shape, dtype and quantization of each output (the runner must be active)."""
        self._require_active("asking for its metadata")
        return self.output_metadata_impl()

    @property
    def active_providers(self) -> list[str] | None:
        """The execution providers the runtime chose, for runtimes that have them (ONNX Runtime); None otherwise."""
        return None

    def execution_details(self, feed: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
        """Flat row fields on how the runtime executes the model (LiteRT: the nodes its delegate took; ONNX
        Runtime: the kernel types a session runs), measured on the active runner; ``feed`` (float) is a sample
        input for runtimes that need a run to tell. Empty for runtimes that cannot say."""
        return {}

    def deactivate(self) -> None:
        if self.is_active:
            self.deactivate_impl()
            self.is_active = False

    def __enter__(self) -> "Runner":
        return self.activate()

    def __exit__(self, *exc: Any) -> None:
        self.deactivate()

    def infer(self, feed: Mapping[str, np.ndarray] | np.ndarray, raw: bool = False) -> dict[str, np.ndarray]:
        """Run one batch.

        Args:
            feed: ``{input name: array}``, or a bare array for single-input models.
            raw: Pass/return integer tensors as they are instead of (de)quantizing them.

        Raises:
            RuntimeBackendError: Not activated, unknown/missing input names, or wrong shapes.
        """
        start = time.perf_counter()
        self._require_active("running it")
        feed = self._check_feed(feed, raw)
        self._runtime_seconds = None
        out = self.infer_impl(feed, raw)
        wall = time.perf_counter() - start
        self.last_query_time = wall
        self.last_inference_time = self._runtime_seconds if self._runtime_seconds is not None else wall
        return out

    def _check_feed(self, feed: Mapping[str, np.ndarray] | np.ndarray, raw: bool) -> dict[str, np.ndarray]:
        metas = self.input_metadata()
        if isinstance(feed, np.ndarray):
            if len(metas) != 1:
                raise RuntimeBackendError(f"{self.name}: model has {len(metas)} inputs; pass a dict by name")
            feed = {metas[0].name: feed}
        names = {m.name for m in metas}
        unknown, missing = set(feed) - names, names - set(feed)
        if unknown or missing:
            raise RuntimeBackendError(
                f"{self.name}: inputs do not match the model: unknown {sorted(unknown)}, missing {sorted(missing)}; "
                f"the model takes {', '.join(m.describe() for m in metas)}"
            )
        checked = {}
        for m in metas:
            x = np.asarray(feed[m.name])
            expected_rank = len(m.shape)
            fixed = [(i, d) for i, d in enumerate(m.shape) if d is not None and i > 0]
            if x.ndim != expected_rank or any(x.shape[i] != d for i, d in fixed):
                raise RuntimeBackendError(
                    f"{self.name}: wrong shape for input '{m.name}': got {tuple(x.shape)}, the model takes "
                    f"{m.describe()} (first dimension = batch)"
                )
            if not raw and x.dtype != np.float32:
                if x.dtype.kind not in "fiu":
                    raise RuntimeBackendError(f"{self.name}: input '{m.name}' has non-numeric dtype {x.dtype}")
                x = x.astype(np.float32)
            checked[m.name] = x
        return checked
