"""ONNX Runtime runner: CPU by default; CUDA / TensorRT execution providers when present and asked for.

:func:`make_session` is the one place an ``InferenceSession`` is configured (threads, providers, session
configuration entries, optimization level); the runner, the calibration statistics pass and sensitivity
analysis all use it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from quantship.errors import RuntimeBackendError
from quantship.lazy import lazy_import
from quantship.runtime.base import Runner, RunnerOptions, TensorMeta
from quantship.runtime.registry import RuntimeInfo, register_runtime

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
}
# Session settings under which ONNX Runtime runs a Q/DQ model as fake-quant (dequantize, then the float op): what
# TensorRT's int8 kernels approximate to within rounding. At ORT's default optimization level it instead rewrites
# Q/DQ pairs into its own int8 kernels (int8 -> uint8 activations, QLinearConv), whose u8 x s8 path on CPUs with
# AVX2 but no VNNI adds pairs of products in 16 bits and saturates: the numbers then depend on the CPU.
QDQ_FAKE_QUANT: tuple[tuple[str, str], ...] = (("session.disable_quant_qdq", "1"),)

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def provider_names(providers: Sequence[str]) -> list[str]:
    """Full execution provider names from aliases (``cpu``, ``cuda``, ``tensorrt``) or full names."""
    return [PROVIDER_ALIASES.get(p.strip().lower(), p.strip()) for p in providers if p.strip()]


def make_session(
    model: str | os.PathLike | bytes | Any,
    threads: int | None = None,
    providers: Sequence[str] = ("cpu",),
    session_config: Sequence[tuple[str, str]] = (),
    optimization: str | None = None,
    what: str = "the model",
    optimized_model_path: str | os.PathLike | None = None,
) -> Any:
    """An ``onnxruntime.InferenceSession``.

    Args:
        model: Path, serialized bytes or an ``onnx.ModelProto``.
        threads: Intra-op threads (None: ONNX Runtime's default); inter-op is 1 when set.
        providers: Execution providers in priority order. One asked for but absent from this onnxruntime
            build is an error, never a silent fallback.
        session_config: Session configuration entries (``session.disable_quant_qdq`` = ``1``, ...).
        optimization: ``disable`` (keep the graph as it is: statistics passes) or None (ORT's default).
        optimized_model_path: Save the graph ORT actually runs here (see :func:`fused_int8_ops`).

    Raises:
        RuntimeBackendError: Missing provider, or a model ONNX Runtime cannot load.
    """
    ort = lazy_import("onnxruntime", purpose="running ONNX models")
    names = provider_names(providers)
    available = ort.get_available_providers()
    missing = [p for p in names if p not in available]
    if missing:
        raise RuntimeBackendError(
            f"ONNX Runtime execution provider(s) {missing} are not available in this onnxruntime build "
            f"(available: {available}); install onnxruntime-gpu for CUDA/TensorRT"
        )
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    for key, value in session_config:
        opts.add_session_config_entry(key, str(value))
    if optimization == "disable":
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if optimized_model_path is not None:
        opts.optimized_model_filepath = str(optimized_model_path)
    source = model
    if hasattr(model, "SerializeToString"):
        source = model.SerializeToString()
    elif not isinstance(model, bytes):
        source = str(model)
    try:
        return ort.InferenceSession(source, sess_options=opts, providers=names)
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
        first = str(exc).strip().splitlines()[0][:400] if str(exc).strip() else type(exc).__name__
        raise RuntimeBackendError(f"{what}: ONNX Runtime cannot load the model ({first})") from None


# ONNX Runtime's own int8 kernels: a Q/DQ pair that ORT fused into one of these no longer computes
# dequantize -> float op -> quantize, and its result depends on the CPU's int8 instructions.
FUSED_INT8_OPS = frozenset(
    {
        "QLinearConv",
        "QLinearMatMul",
        "QLinearAdd",
        "QLinearMul",
        "QLinearAveragePool",
        "QLinearGlobalAveragePool",
        "QLinearSigmoid",
        "QLinearLeakyRelu",
        "QLinearConcat",
        "QLinearSoftmax",
        "QGemm",
        "ConvInteger",
        "MatMulInteger",
        "DynamicQuantizeMatMul",
        "MatMulIntegerToFloat",
        "NhwcQLinearConv",
    }
)


def fused_int8_ops(optimized_model: str | os.PathLike) -> list[str]:
    """Names (``op_type:node``) of the nodes in a graph saved by ONNX Runtime that are its fused int8 kernels."""
    onnx = lazy_import("onnx")
    graph = onnx.load(str(optimized_model)).graph
    return [f"{n.op_type}:{n.name}" for n in graph.node if n.op_type in FUSED_INT8_OPS]


class OnnxRunner(Runner):
    """Runs an ONNX model with ``onnxruntime.InferenceSession``.

    Args:
        model: The ``.onnx`` file, or serialized model bytes.
        providers: Execution providers in priority order (``cpu``, ``cuda``, ``tensorrt`` or full names).
        num_threads: Intra-op threads (None: onnxruntime's default).
        session_config: Session configuration entries.
    """

    def __init__(
        self,
        model: str | os.PathLike | bytes,
        providers: Sequence[str] = ("cpu",),
        num_threads: int | None = None,
        name: str | None = None,
        session_config: Sequence[tuple[str, str]] = (),
    ):
        in_memory = isinstance(model, bytes)
        super().__init__(name or ("onnx" if in_memory else Path(model).stem))
        self.model = model if in_memory else Path(model)
        self.providers = provider_names(providers)
        self.num_threads = num_threads
        self.session_config = tuple(session_config)
        self._session = None

    @property
    def path(self) -> Path | None:
        return None if isinstance(self.model, bytes) else self.model

    def activate_impl(self) -> None:
        if self.path is not None and not self.path.is_file():
            raise RuntimeBackendError(f"ONNX model not found: {self.path}")
        self._session = make_session(
            self.model, self.num_threads, self.providers, self.session_config, what=str(self.path or self.name)
        )
        self._inputs = self._meta(self._session.get_inputs())
        self._outputs = self._meta(self._session.get_outputs())
        self._output_names = [m.name for m in self._outputs]

    def infer_impl(self, feed: dict[str, np.ndarray], raw: bool) -> dict[str, np.ndarray]:
        try:
            outs = self._time_runtime(self._session.run, self._output_names, feed)
        except Exception as exc:  # noqa: BLE001
            raise RuntimeBackendError(
                f"{self.name}: inference failed: {str(exc).strip().splitlines()[0][:400]}"
            ) from None
        return dict(zip(self._output_names, outs))

    def deactivate_impl(self) -> None:
        self._session = None

    @staticmethod
    def _meta(items) -> list[TensorMeta]:
        return [
            TensorMeta(
                i.name,
                tuple(d if isinstance(d, int) else None for d in i.shape),
                np.dtype(_ORT_TYPES.get(i.type, np.float32)),
            )
            for i in items
        ]

    def input_metadata_impl(self) -> list[TensorMeta]:
        return self._inputs

    def output_metadata_impl(self) -> list[TensorMeta]:
        return self._outputs

    @property
    def active_providers(self) -> list[str]:
        return list(self._session.get_providers()) if self._session else []


def _make(source: Any, options: RunnerOptions, name: str | None) -> OnnxRunner:
    return OnnxRunner(
        source,
        providers=options.providers,
        num_threads=options.threads,
        name=name,
        session_config=options.session_config,
    )


register_runtime(RuntimeInfo("onnx", _make, suffixes=(".onnx",), description="ONNX Runtime (CPU provider by default)"))
