"""ONNX Runtime runner: CPU by default; CUDA / TensorRT execution providers when present and asked for.

:func:`make_session` is the one place an ``InferenceSession`` is configured (threads, providers, session
configuration entries, optimization level); the runner, the calibration statistics pass and sensitivity
analysis all use it.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from quantship.errors import RuntimeBackendError
from quantship.lazy import is_available, lazy_import
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


def unavailable_providers(providers: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the providers asked for that this onnxruntime build lacks, the ones it has)."""
    ort = lazy_import("onnxruntime", purpose="running ONNX models")
    available = ort.get_available_providers()
    return [p for p in provider_names(providers) if p not in available], available


@dataclass(frozen=True)
class SessionDumps:
    """What a session writes beside running, to see what ONNX Runtime did (None: nothing).

    Attributes:
        optimized_model_path: Save the graph ORT actually runs here (see :func:`fused_int8_ops`).
        profile_prefix: Turn ORT's profiler on, its JSON file named from this prefix (see
            :func:`executed_kernels`).
    """

    optimized_model_path: str | os.PathLike | None = None
    profile_prefix: str | os.PathLike | None = None


def make_session(
    model: str | os.PathLike | bytes | Any,
    threads: int | None = None,
    providers: Sequence[str] = ("cpu",),
    session_config: Sequence[tuple[str, str]] = (),
    optimization: str | None = None,
    what: str = "the model",
    dumps: SessionDumps = SessionDumps(),
) -> Any:
    """An ``onnxruntime.InferenceSession``.

    Args:
        model: Path, serialized bytes or an ``onnx.ModelProto``.
        threads: Intra-op threads (None: ONNX Runtime's default); inter-op is 1 when set.
        providers: Execution providers in priority order. One asked for but absent from this onnxruntime
            build is an error, never a silent fallback.
        session_config: Session configuration entries (``session.disable_quant_qdq`` = ``1``, ...).
        optimization: ``disable`` (keep the graph as it is: statistics passes) or None (ORT's default).
        dumps: The optimized graph and the profile to write.

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
    if dumps.optimized_model_path is not None:
        opts.optimized_model_filepath = str(dumps.optimized_model_path)
    if dumps.profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(dumps.profile_prefix)
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


def fused_int8_ops(optimized_model: str | os.PathLike | Any) -> list[str]:
    """Names (``op_type:node``) of the nodes in a graph saved by ONNX Runtime (a path, or the loaded model) that are
    its fused int8 kernels."""
    onnx = lazy_import("onnx")
    graph = (optimized_model if hasattr(optimized_model, "graph") else onnx.load(str(optimized_model))).graph
    return [f"{n.op_type}:{n.name}" for n in graph.node if n.op_type in FUSED_INT8_OPS]


def optimized_graph(
    model: str | os.PathLike | bytes | Any,
    session_config: Sequence[tuple[str, str]] = (),
    threads: int | None = None,
    providers: Sequence[str] = ("cpu",),
) -> Any:
    """The graph ONNX Runtime actually runs for ``model`` under these session options (``onnx.ModelProto``)."""
    onnx = lazy_import("onnx")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "optimized.onnx"
        make_session(model, threads, providers, session_config, dumps=SessionDumps(optimized_model_path=path))
        return onnx.load(str(path))


def executed_kernels(
    model: str | os.PathLike | bytes,
    feed: dict[str, np.ndarray],
    threads: int | None = None,
    providers: Sequence[str] = ("cpu",),
    session_config: Sequence[tuple[str, str]] = (),
) -> dict[str, int]:
    """The kernels an ONNX Runtime session executes for one run of ``feed``: ``{"<op type>@<provider>": count}``
    from ORT's own profile (what ran, after its graph optimizations and fusions; not the file's node types).

    A separate profiled session: profiling slows the run it records, so the timed session never has it on.
    """

    with tempfile.TemporaryDirectory() as tmp:
        dumps = SessionDumps(profile_prefix=Path(tmp) / "profile")
        session = make_session(model, threads, providers, session_config, dumps=dumps)
        session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    counts: dict[str, int] = {}
    for e in events:
        args = e.get("args") or {}
        if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time") and "op_name" in args:
            provider = str(args.get("provider", "")).replace("ExecutionProvider", "")
            key = f"{args['op_name']}@{provider}" if provider else args["op_name"]
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


@dataclass
class TappedModel:
    """A model with intermediate tensors added as graph outputs (:func:`tap_tensors`).

    Attributes:
        model: The ``onnx.ModelProto`` with the extra outputs.
        outputs: Tensor -> the graph output that holds it.
        steps: Tensor -> its quantization step, for the tensors read after their QuantizeLinear.
        unobservable: Tensors ONNX Runtime no longer computes as such (fused into a kernel) under the session
            options given: reading them would change what it runs.
    """

    model: Any
    outputs: dict[str, str] = field(default_factory=dict)
    steps: dict[str, float] = field(default_factory=dict)
    unobservable: list[str] = field(default_factory=list)


def _activations_to_uint8(m: Any) -> None:
    """Rewrite, in place, each int8 activation Q -> DQ pair as uint8 with zero point + 128, as ONNX Runtime's
    ``QDQS8ToU8Transformer`` does when it loads the model (the values are the same), on the pairs it converts: a Q
    read by one DQ that is read by one node. Done beforehand, a tap's extra DequantizeLinear of the Q leaves ORT's
    fusions as they were (checked by the caller on the graph ORT runs)."""
    from onnx import numpy_helper

    inits = {i.name: i for i in m.graph.initializer}
    readers: dict[str, list[Any]] = {}
    for n in m.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    made: dict[str, str] = {}
    for q in [n for n in m.graph.node if n.op_type == "QuantizeLinear" and len(n.input) == 3]:
        zp = inits.get(q.input[2])
        users = readers.get(q.output[0], [])
        if zp is None or q.input[0] in inits or len(users) != 1 or users[0].op_type != "DequantizeLinear":
            continue
        if len(readers.get(users[0].output[0], [])) != 1:  # nor does ORT convert a pair whose DQ has several readers
            continue
        value = numpy_helper.to_array(zp)
        if value.dtype != np.int8 or value.size != 1 or users[0].input[2] != q.input[2]:
            continue
        if q.input[2] not in made:
            made[q.input[2]] = f"{q.input[2]}__u8"
            m.graph.initializer.append(
                numpy_helper.from_array((value.astype(np.int16) + 128).astype(np.uint8), made[q.input[2]])
            )
        q.input[2] = users[0].input[2] = made[q.input[2]]


def tap_tensors(model: Any, tensors: Sequence[str], computed: set[str] | None = None) -> TappedModel:
    """A copy of ``model`` whose outputs also hold ``tensors``, each as the rest of the graph sees it.

    A tensor that feeds a QuantizeLinear is read after quantization: a new DequantizeLinear of the Q's output
    becomes the graph output, so the DQ -> op -> Q groups ONNX Runtime fuses stay as they were (exposing the float
    tensor, or the existing DQ's output, would keep ORT from fusing them; int8 pairs are made uint8 first, see
    :func:`_activations_to_uint8`). Other tensors are exposed as they are, when they are in ``computed`` (the node
    outputs of the graph ORT optimized, :func:`optimized_graph`; None: all).
    """
    onnx = lazy_import("onnx")
    from onnx import helper, numpy_helper

    tapped = TappedModel(onnx.ModelProto())
    m = tapped.model
    m.CopyFrom(model)
    _activations_to_uint8(m)
    inits = {i.name: i for i in m.graph.initializer}
    quantizer = {n.input[0]: n for n in m.graph.node if n.op_type == "QuantizeLinear"}
    existing = {o.name for o in m.graph.output}
    graph_inputs = {i.name for i in m.graph.input}
    for t in dict.fromkeys(tensors):
        q = quantizer.get(t)
        if q is not None:
            out = f"{t}__tap_dq"
            attrs = {a.name: helper.get_attribute_value(a) for a in q.attribute if a.name == "axis"}
            dq_inputs = [q.output[0], *q.input[1:]]
            m.graph.node.append(helper.make_node("DequantizeLinear", dq_inputs, [out], name=f"{t}__tap", **attrs))
            scale = inits.get(q.input[1])
            if scale is not None and numpy_helper.to_array(scale).size == 1:
                tapped.steps[t] = float(numpy_helper.to_array(scale).reshape(-1)[0])
        elif t in existing or t in graph_inputs or computed is None or t in computed:
            out = t
        else:
            tapped.unobservable.append(t)
            continue
        if out not in existing:
            m.graph.output.append(helper.make_empty_tensor_value_info(out))
            existing.add(out)
        tapped.outputs[t] = out
    return tapped


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

    def execution_details(self, feed=None) -> dict[str, Any]:
        """``ort_kernels``: the kernel types a session with this runner's options executes, from ORT's profile
        (``{"QLinearConv@CPU": 3, ...}``); ``ort_int8_kernels``: how many of them are ORT's fused int8 kernels."""
        self._require_active("reading the kernels it runs")
        if feed is None:
            return {}
        kernels = executed_kernels(self.model, dict(feed), self.num_threads, self.providers, self.session_config)
        int8 = sum(n for k, n in kernels.items() if k.split("@")[0] in FUSED_INT8_OPS)
        return {"ort_kernels": kernels, "ort_int8_kernels": int8}

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


def _row_fields(options: RunnerOptions) -> dict[str, Any]:
    return {"providers": provider_names(options.providers)}


register_runtime(
    RuntimeInfo(
        "onnx",
        _make,
        suffixes=(".onnx",),
        description="ONNX Runtime (CPU provider by default)",
        available=lambda: is_available("onnxruntime"),
        row_fields=_row_fields,
        distributions=("tf2onnx", "onnx", "onnxruntime"),  # tf2onnx exports, onnx rewrites, ONNX Runtime runs
    )
)
