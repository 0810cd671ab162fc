"""From one statistics pass to every calibration output: ranges JSON, TensorRT cache, Q/DQ ONNX model, ONNX
Runtime int8 model. The pass observes the tensors the Q/DQ layouts (:mod:`quantship.convert.qdq`,
:mod:`quantship.convert.ort_layout`) read; the ranges come from :mod:`quantship.calibrate.api`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from quantship.calibrate.api import CalibrationResult
from quantship.calibrate.collector import StatisticsCollector
from quantship.calibrate.trt_cache import DEFAULT_TRT_VERSION, write_cache
from quantship.convert.artifact import write_onnx_artifact
from quantship.convert.ort_layout import OrtQdqReport, OrtWeights, insert_ort_qdq, ort_tensors
from quantship.convert.qdq import QdqReport, insert_qdq, qdq_tensors
from quantship.errors import ConfigError
from quantship.fileio import write_json_atomic
from quantship.lazy import lazy_import


def collect_statistics(
    onnx_model: Any, feed: Iterable, scope: str = "all", threads: int | None = None, extra: Iterable[str] = ()
) -> StatisticsCollector:
    """One pass of the feed through the model.

    Args:
        onnx_model: ``onnx.ModelProto`` or path.
        feed: Iterable of input batches.
        scope: ``all`` (every float activation: what a TensorRT cache holds) or ``qdq`` (only the tensors the
            Q/DQ layouts need, TensorRT's and ONNX Runtime's: faster).
        extra: More tensors to observe with ``qdq`` (the Keras layer outputs whose ranges a TFLite model takes).
    """
    onnx = lazy_import("onnx")
    model = onnx.load(str(onnx_model)) if isinstance(onnx_model, (str, Path)) else onnx_model
    if scope not in ("all", "qdq"):
        raise ConfigError(f"statistics scope must be 'all' or 'qdq', got '{scope}'")
    tensors = None if scope == "all" else list(dict.fromkeys([*layout_tensors(model), *extra]))
    collector = StatisticsCollector(model, tensors, threads=threads)
    collector.collect(feed)
    return collector


def layout_tensors(model: Any) -> list[str]:
    """The tensors whose statistics the Q/DQ layouts read (TensorRT's first, then ONNX Runtime's), without repeats."""
    return list(dict.fromkeys([*qdq_tensors(model), *ort_tensors(model)]))


@dataclass(frozen=True)
class CalibrationOutputs:
    """Where the outputs of one calibration go (None: not written).

    Attributes:
        cache: TensorRT calibration cache.
        qdq: Q/DQ ONNX model.
        ranges: Ranges JSON.
    """

    cache: str | Path | None = None
    qdq: str | Path | None = None
    ranges: str | Path | None = None


def write_outputs(
    result: CalibrationResult,
    onnx_model: Any,
    outputs: CalibrationOutputs,
    exclude: Iterable[str] = (),
    node_layers: dict[str, str] | None = None,
    trt_version: str = DEFAULT_TRT_VERSION,
    manifest: dict[str, Any] | None = None,
) -> QdqReport | None:
    """Write whichever of cache / Q/DQ model / ranges JSON ``outputs`` asks for (each atomically)."""
    report = None
    cache, qdq, ranges = outputs.cache, outputs.qdq, outputs.ranges
    if cache:
        write_cache(cache, result.trt_cache(trt_version))
    if ranges:
        write_json_atomic(ranges, result.ranges_document(manifest))
    if qdq:
        onnx = lazy_import("onnx")
        model = onnx.load(str(onnx_model)) if isinstance(onnx_model, (str, Path)) else onnx_model
        qmodel, report = insert_qdq(model, result.amax, exclude, node_layers)
        write_onnx_artifact(
            qmodel,
            qdq,
            {
                **(manifest or {}),
                "precision": "int8-qdq",
                "calibration_method": result.calibrator.describe(),
                "qdq_report": report.lines(),
            },
        )
    return report


def write_ort_model(
    result: CalibrationResult,
    onnx_model: Any,
    path: str | Path,
    manifest: dict[str, Any] | None = None,
    weights: OrtWeights = OrtWeights(),
) -> OrtQdqReport:
    """Write the ONNX Runtime int8 model (:func:`~quantship.convert.ort_layout.insert_ort_qdq`) of one
    calibration, with a manifest that says how its weights are stored and that it needs no session option."""
    onnx = lazy_import("onnx")
    model = onnx.load(str(onnx_model)) if isinstance(onnx_model, (str, Path)) else onnx_model
    qmodel, report = insert_ort_qdq(model, result.stats, result.amax, weights)
    write_onnx_artifact(
        qmodel,
        path,
        {
            **(manifest or {}),
            "precision": "int8-qdq-ort",
            "calibration_method": result.calibrator.describe(),
            "ort_layout": {
                "activations": "uint8, asymmetric, per tensor",
                "weights": {**weights.describe(), "granularity": "per output channel, symmetric"},
                "exact_on_x86_without_vnni": weights.exact_without_vnni,
                "session_options_needed": {},
                # per weighted layer: its weight type, how many channels were held below the u8 x s8 pair
                # limit and why (quantship.convert.ort_layout.LayerLayout)
                "layers": [la.to_dict() for la in report.layers],
            },
            "qdq_report": report.lines(),
        },
    )
    return report
