"""``tflite-int8-<method>``: the converter calibrates only, our ranges replace its recorded min/max (mapped through
the Keras layer names), then it quantizes. Pins the private converter API this needs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import TINY_PREPROCESS, block_model
from quantship.config import IODType, Precision
from quantship.errors import ConfigError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def blocks(tmp_path_factory):
    from quantship.convert.tflite import TfliteConverter

    model = block_model()
    rng = np.random.default_rng(1)
    batches = [rng.normal(size=(4, 24, 24, 3)).astype(np.float32) for _ in range(3)]
    conv = TfliteConverter(model, tmp_path_factory.mktemp("log") / "convert.log")
    calibrated = conv.calibrate_only(lambda: batches)
    yield model, batches, conv, calibrated
    conv.close()


def _run(data: bytes, x: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=data)
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    interp.set_tensor(inp["index"], x)
    interp.invoke()
    return interp.get_tensor(out["index"])


def test_private_calibrate_only_api_is_what_quantship_was_written_against():
    """Fails loudly (naming what changed) when TensorFlow changes the private calibrate-only path."""
    import inspect

    from tensorflow.lite.python import convert as tfl_convert
    from tensorflow.lite.python import lite as tfl_lite

    from quantship.convert.tflite import CALIBRATE_ONLY_ATTR, MLIR_QUANTIZE_PARAMS, check_private_api

    check_private_api()
    assert CALIBRATE_ONLY_ATTR in inspect.getsource(tfl_lite.TFLiteConverterBase._quantize)
    assert set(MLIR_QUANTIZE_PARAMS) <= set(inspect.signature(tfl_convert.mlir_quantize).parameters)


def test_calibrate_then_quantize_equals_the_converter(blocks):
    """With the recorded ranges untouched, calibrate-only + quantize is exactly what convert() makes."""
    from quantship.convert.tflite import TfliteSpec

    model, batches, conv, calibrated = blocks
    ours = conv.quantize_calibrated(calibrated, IODType.INT8)
    theirs = conv.convert(TfliteSpec(Precision.INT8, IODType.INT8), lambda: batches)
    x = np.random.default_rng(5).integers(-128, 127, size=(1, 24, 24, 3)).astype(np.int8)
    np.testing.assert_array_equal(_run(ours, x), _run(theirs, x))


def test_tflite_tensors_map_to_our_statistics_through_keras_layers(blocks):
    """Every recorded TFLite range but the softmax output finds the ONNX tensor of the same Keras layer, and the
    two passes saw the same values there. The one exception is TFLite's own: the residual branch's recorded range
    also covers the Add output's values (the Add reuses its buffer in place before the calibrator is done with
    it), so the converter quantizes it more coarsely than its values need."""
    from quantship.convert.calibrated import collect_statistics
    from quantship.convert.onnx import keras_to_onnx, onnx_layer_outputs
    from quantship.convert.tflite import tensor_ranges, tflite_tensor_layers

    model, batches, _, calibrated = blocks
    layers = tflite_tensor_layers(calibrated, model)
    recorded = tensor_ranges(calibrated)
    proto = keras_to_onnx(model)
    outputs = onnx_layer_outputs(proto, model)
    stats = collect_statistics(proto, batches, scope="qdq", extra=outputs.values()).stats
    assert set(layers.values()) == {
        "input",
        "stem_relu6",
        "dw_pad",
        "dw_relu6",
        "project_bn",
        "add",
        "avg_pool",
        "predictions",
    }
    assert [recorded[i][0] for i in recorded if i not in layers] == ["StatefulPartitionedCall_1:0"]
    for i, layer in layers.items():
        s, (_, lo, hi) = stats[outputs[layer]], recorded[i]
        if layer == "project_bn":
            add = stats[outputs["add"]]
            assert (lo, hi) == pytest.approx((min(s.min, add.min), max(s.max, add.max)), rel=1e-4)
            assert s.max < hi
        else:
            assert (s.min, s.max) == pytest.approx((lo, hi), rel=1e-4, abs=1e-5), layer


def test_our_ranges_reach_the_quantized_model(blocks):
    """amax -> [0, amax] on a ReLU6 output (zero point -128), [-amax, amax] on a signed tensor (zero point 0)."""
    from ai_edge_litert.interpreter import Interpreter

    from quantship.convert.tflite import ranges_from_amax, tensor_ranges

    model, _, conv, calibrated = blocks
    recorded = tensor_ranges(calibrated)
    tensors = {"stem_relu6": "a", "project_bn": "b", "input": "c"}
    amax, minimum = {"a": 1.5, "b": 0.75, "c": 2.0}, {"a": 0.0, "b": -0.3, "c": -2.0}
    rep = ranges_from_amax(calibrated, model, tensors, amax, minimum)
    assert len(rep.ranges) == 3 and len(rep.kept) == len(recorded) - 3
    interp = Interpreter(model_content=conv.quantize_calibrated(calibrated, IODType.INT8, rep.ranges))
    by_name = {d["name"]: d["quantization"] for d in interp.get_tensor_details() if d["dtype"] == np.int8}
    relu = next(q for n, q in by_name.items() if n.startswith("blocks_1/stem_relu6") and q[0] > 0)
    proj = next(q for n, q in by_name.items() if n.startswith("blocks_1/project_bn") and q[0] > 0)
    assert relu == pytest.approx((1.5 / 255, -128))
    assert proj[0] == pytest.approx(1.5 / 255) and abs(proj[1]) <= 1
    assert interp.get_input_details()[0]["quantization"][0] == pytest.approx(4.0 / 255)


def test_target_names_tell_methods_from_io_suffixes():
    from quantship.targets import get_target, parse_targets

    names = [t.name for t in parse_targets("tflite-int8,tflite-int8-entropy,tflite-int8-uint8io,tflite-int8-floatio")]
    assert names == ["tflite-int8", "tflite-int8-entropy", "tflite-int8-uint8io", "tflite-int8-floatio"]
    assert get_target("tflite-int8").spec.calibration is None  # the converter's own calibration
    assert get_target("tflite-int8-mse").spec.calibration.value == "mse"
    assert get_target("tflite-int8-mse").spec.io_dtype is IODType.INT8
    assert get_target("tflite-int8-uint8io").spec.calibration is None
    with pytest.raises(ConfigError, match="'kl' is neither a calibration method of tflite-int8"):
        get_target("tflite-int8-kl")


def test_eval_records_the_method_in_the_manifest(trained_tiny, synset_dataset, tmp_path):
    from quantship.config import CalibrationSpec
    from quantship.config import parse_preprocess_overrides as ppo
    from quantship.jobs.eval import EvalSpec, run_eval

    _, model_path = trained_tiny
    spec = EvalSpec(
        model=str(model_path),
        data=f"imagenet:{synset_dataset}",
        targets=["keras-fp32", "tflite-int8", "tflite-int8-max", "tflite-int8-entropy", "qdq-int8-entropy"],
        out_dir=tmp_path,
        limit=24,
        calibration=CalibrationSpec(num_images=12),
        preprocess_overrides=ppo(TINY_PREPROCESS),
    )
    rows = {r["target"]: r for r in run_eval(spec).rows}
    assert all(r["agreement_top1"] >= 0.9 for r in rows.values())
    for method in ("max", "entropy"):
        m = json.loads(open(rows[f"tflite-int8-{method}"]["manifest"]).read())
        assert m["calibration_method"] == method and m["io_dtype"] == "int8"
        assert m["tensors_with_our_range"] >= 5 and m["tensors_with_converter_range"] == ["StatefulPartitionedCall_1:0"]
    plain = json.loads(open(rows["tflite-int8"]["manifest"]).read())
    assert "calibration_method" not in plain


def test_plan_method_applies_only_to_targets_without_one_in_their_name():
    from quantship.signoff.plan import SignoffPlan

    base = {
        "models": ["mobilenet_0.25_128"],
        "targets": ["qdq-int8-max", "trt-int8-qdq"],
        "dataset": "imagenet:/x",
        "gates": [{"metric": "top1", "relative": 0.99}],
    }
    assert SignoffPlan.from_dict(base).tensorrt.qdq_method is None  # entropy, the default
    plan = SignoffPlan.from_dict({**base, "calibration": {"method": "mse"}})
    assert plan.tensorrt.qdq_method.value == "mse"
    with pytest.raises(ConfigError, match="both set the calibration of trt-int8-qdq"):
        SignoffPlan.from_dict({**base, "calibration": {"method": "mse"}, "tensorrt": {"qdq_method": "max"}})
    # No target takes them: the names say which method each target uses.
    SignoffPlan.from_dict(
        {**base, "targets": ["qdq-int8-max"], "calibration": {"method": "mse"}, "tensorrt": {"qdq_method": "max"}}
    )
