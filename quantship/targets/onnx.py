"""ONNX targets: the float export on ONNX Runtime (``onnx-fp32``) and the Q/DQ int8 model in TensorRT's placement,
run as fake-quant on ONNX Runtime (``qdq-int8-<method>``, alias ``onnx-int8-<method>``). Export:
:mod:`quantship.convert.onnx`; Q/DQ rewrite: :mod:`quantship.convert.qdq`; runner:
:mod:`quantship.runtime.onnxruntime`."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from quantship.config import CalibrationMethod, Precision, TargetSpec
from quantship.convert.calibrated import CalibrationOutputs, write_outputs
from quantship.convert.layer_names import KerasLayers, onnx_tensor_layers
from quantship.manifest import Artifact
from quantship.runtime.onnxruntime import QDQ_FAKE_QUANT, OnnxRunner, fused_int8_ops, optimized_graph, tap_tensors
from quantship.targets.base import (
    BuildContext,
    Capture,
    LayerProbe,
    ProbeOptions,
    Target,
    get_target,
    register_alias,
    register_layer_probe,
    register_target,
)
from quantship.targets.calibrated import calibrated_build, onnx_export


def _onnx_fp32_build(ctx: BuildContext, spec: TargetSpec) -> Artifact:
    return onnx_export(ctx)


def qdq_build(ctx: BuildContext, spec: TargetSpec) -> Artifact:
    fields = {
        "runtime_session_config": dict(get_target(spec.name).session_config),
        "qdq_placement": "residual-skip-quantized",  # NVIDIA's residual-Add rule (issue 12): older files differ
    }
    return calibrated_build(
        ctx,
        spec,
        ".onnx",
        fields,
        lambda result, fp32, path, manifest: write_outputs(
            result, fp32, CalibrationOutputs(qdq=path), manifest=manifest
        ),
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


# ------------------------------------------------------------------------------------ diff: layer probe


class OnnxProbe(LayerProbe):
    """ONNX: the tensors added as graph outputs, a quantized one read after its Q/DQ through a new
    DequantizeLinear (for a fused ORT int8 model: what its integer kernels wrote), under the session options the
    target runs with. Tensors ONNX Runtime fused away cannot be read without changing what it runs and are left
    out; the number of fused int8 kernels is checked to be the same with and without the extra outputs."""

    def __init__(
        self,
        name: str,
        path: Path,
        layers: KerasLayers,
        session_config: tuple[tuple[str, str], ...],
        threads: int | None,
        providers: Sequence[str],
    ):
        import onnx

        self.name, self.session_config, self.notes = name, session_config, []
        model = onnx.load(str(path))
        mapping = onnx_tensor_layers(model, layers)
        names = [t.name for t in mapping.values()]

        def int8_kernels(m: Any) -> Counter:  # which nodes ORT fused into which kernel (names without its tokens)
            return Counter(re.sub(r"_token_\d+$", "", op) for op in fused_int8_ops(m))

        ran = optimized_graph(model, session_config, threads, providers)
        kernels = int8_kernels(ran)
        # Every mapped tensor as an output, unless that keeps ORT from fusing an int8 group (a float tensor inside
        # DQ -> Conv -> Q): then only the tensors ORT still computes. Float-only fusions (Conv + ReLU) do not matter.
        tapped = tap_tensors(model, names)
        tapped_kernels = int8_kernels(optimized_graph(tapped.model, session_config, threads, providers))
        if tapped_kernels != kernels:
            tapped = tap_tensors(model, names, {o for n in ran.graph.node for o in n.output})
            tapped_kernels = int8_kernels(optimized_graph(tapped.model, session_config, threads, providers))
        if kernels:
            ops = Counter(k.split(":")[0] for k in kernels.elements())
            self.notes.append("ONNX Runtime int8 kernels: " + ", ".join(f"{k} x{n}" for k, n in sorted(ops.items())))
        if tapped_kernels != kernels:
            self.notes.append(
                f"WARNING: reading intermediate tensors changed ONNX Runtime's fusions ({len(kernels)} -> "
                f"{len(tapped_kernels)} int8 kernels): the tensors are those of a slightly different graph"
            )
        if tapped.unobservable:
            self.notes.append(f"{len(tapped.unobservable)} layer output(s) fused away by ONNX Runtime, not compared")
        self._map = {layer: t for layer, t in mapping.items() if t.name in tapped.outputs}
        self._tapped = tapped
        self.tensors = {layer: t.name for layer, t in self._map.items()}
        self._runner = OnnxRunner(
            tapped.model.SerializeToString(), providers, threads, name, session_config=session_config
        ).activate()

    def run(self, x: np.ndarray) -> Capture:
        outs = self._runner.infer(x)
        out: Capture = {}
        for layer, t in self._map.items():
            value = outs[self._tapped.outputs[t.name]]
            if t.channels_first and value.ndim == 4:
                value = value.transpose(0, 2, 3, 1)
            out[layer] = (value, self._tapped.steps.get(t.name))
        return out

    def close(self) -> None:
        self._runner.deactivate()


def _session_config(target: Target, qdq_ort_defaults: bool) -> tuple[tuple[str, str], ...]:
    if qdq_ort_defaults and target.session_config == QDQ_FAKE_QUANT:
        return ()
    return target.session_config


def _onnx_probe(
    target: Target, artifact: Artifact | None, loaded: Any, layers: KerasLayers, options: ProbeOptions
) -> OnnxProbe:
    config = _session_config(target, options.qdq_ort_defaults)
    return OnnxProbe(target.name, artifact.path, layers, config, options.threads, options.providers)


register_layer_probe("onnx", _onnx_probe)
