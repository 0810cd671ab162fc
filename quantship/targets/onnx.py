"""ONNX targets: the float export on ONNX Runtime (``onnx-fp32``) and the Q/DQ int8 model in TensorRT's placement,
run as fake-quant on ONNX Runtime (``qdq-int8-<method>``, alias ``onnx-int8-<method>``). Export:
:mod:`quantship.convert.onnx`; Q/DQ rewrite: :mod:`quantship.convert.qdq`; runner:
:mod:`quantship.runtime.onnxruntime`."""

from __future__ import annotations

from quantship.config import CalibrationMethod, Precision, TargetSpec
from quantship.manifest import Artifact
from quantship.runtime.onnxruntime import QDQ_FAKE_QUANT
from quantship.targets.base import BuildContext, get_target, register_alias, register_target
from quantship.targets.calibrated import calibrated_build, onnx_export


def _onnx_fp32_build(ctx: BuildContext, spec: TargetSpec) -> Artifact:
    return onnx_export(ctx)


def qdq_build(ctx: BuildContext, spec: TargetSpec) -> Artifact:
    from quantship.convert.calibrated import write_outputs

    fields = {
        "runtime_session_config": dict(get_target(spec.name).session_config),
        "qdq_placement": "residual-skip-quantized",  # NVIDIA's residual-Add rule (issue 12): older files differ
    }
    return calibrated_build(
        ctx,
        spec,
        ".onnx",
        fields,
        lambda result, fp32, path, manifest: write_outputs(result, fp32, qdq=path, manifest=manifest),
    )


register_target(
    TargetSpec("onnx-fp32", "onnx", Precision.FP32, description="ONNX (tf2onnx) on ONNX Runtime, float32"),
    _onnx_fp32_build,
)
for _method in CalibrationMethod:
    _qdq = register_target(
        TargetSpec(
            f"qdq-int8-{_method.value}",
            "onnx",
            Precision.INT8,
            calibration=_method,
            description=f"Q/DQ int8 ONNX (TensorRT placement), {_method.value} calibration, run as fake-quant on ONNX "
            "Runtime CPU: the int8 accuracy TensorRT will get",
        ),
        qdq_build,
        session_config=QDQ_FAKE_QUANT,
    )
    register_alias(f"onnx-int8-{_method.value}", _qdq.name)
