"""ONNX Runtime int8 targets (``ort-int8-<method>``): int8 ONNX laid out for ORT's fused CPU kernels. Rewrite:
:mod:`quantship.convert.ort_layout`; runner: :mod:`quantship.runtime.onnxruntime`."""

from __future__ import annotations

from quantship.config import CalibrationMethod, Precision, TargetSpec
from quantship.convert.calibrated import write_ort_model
from quantship.manifest import Artifact
from quantship.targets.base import BuildContext, register_target
from quantship.targets.calibrated import calibrated_build


def _ort_int8_build(ctx: BuildContext, spec: TargetSpec) -> Artifact:
    # ORT's default session options (what a user's own application opens the file with); the same statistics pass
    # as the Q/DQ targets (it observes the tensors of both layouts).
    return calibrated_build(ctx, spec, ".onnx", {"runtime_session_config": {}, "layout_version": 3}, write_ort_model)


for _method in CalibrationMethod:
    register_target(
        TargetSpec(
            f"ort-int8-{_method.value}",
            "onnx",
            Precision.INT8,
            calibration=_method,
            description=f"int8 ONNX laid out for ONNX Runtime's fused CPU kernels (QLinearConv, uint8 activations), "
            f"{_method.value} calibration, at ORT's default session options: for CPU deployment",
        ),
        _ort_int8_build,
    )
