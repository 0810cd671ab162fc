"""The fallback keeps any op kind in float (softmax, residual add, pooling, the output op), for TFLite and Q/DQ."""

from __future__ import annotations

import pytest

from conftest import synthetic_set, tf_preprocess


@pytest.fixture(scope="module")
def flat_softmax():
    """A residual block and a 100-class head with small logits: every probability is near 0.01, so TFLite's int8
    softmax output (step 1/256) ties the top classes - no set of weighted layers kept float can undo that."""
    import keras

    keras.utils.set_random_seed(5)
    L = keras.layers
    inputs = keras.Input((32, 32, 3), name="input")
    x = L.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="conv1")(inputs)
    y = L.Conv2D(8, 1, activation="relu", name="conv2")(x)
    x = L.Add(name="res_add")([x, y])
    x = L.GlobalAveragePooling2D(name="gap")(x)
    x = L.Dense(100, name="logits", kernel_initializer=keras.initializers.RandomNormal(0, 0.4))(x)
    out = L.Activation("softmax", name="probs")(x)
    model = keras.Model(inputs, out)
    cx, _ = synthetic_set(8, seed=51)
    ex, _ = synthetic_set(14, seed=52)
    from quantship.sensitivity import HeldOut

    calib, x = tf_preprocess(cx), tf_preprocess(ex)
    ref = model.predict(x, verbose=0)
    assert ref.max() < 0.2  # flat: the int8 softmax has ~50 levels for the whole top of the distribution
    return model, calib, HeldOut(x, list(ref.argmax(1)), ref)


@pytest.mark.slow
def test_fallback_keeps_the_int8_softmax_float_where_no_layer_set_passes(flat_softmax, tmp_path):
    from quantship.config import Gate
    from quantship.convert.tflite import TfliteConverter
    from quantship.sensitivity import (
        TfliteBackend,
        combined_ranking,
        find_fallback,
        gate_passes,
        layer_sensitivity,
        score,
    )
    from quantship.sensitivity.fallback import prune_fallback
    from quantship.sensitivity.units import UnitBackend, tflite_units, unit_sensitivity

    model, calib, held = flat_softmax
    gate = Gate(metric="top1", relative=0.99)
    with TfliteConverter(model, tmp_path / "convert.log", work_dir=tmp_path) as conv:
        inner = TfliteBackend(conv, lambda: [calib])
        units = tflite_units(inner, inner.layers)
        # Named from the calibrate-only model (no float conversion): the same units as from the float model.
        assert units == tflite_units(TfliteBackend(conv, lambda: [calib], fast=False), inner.layers)
        kinds = {u.key: u.kind for u in units}
        assert kinds["add:res_add"] == "add" and kinds["pool:gap"] == "pool"
        softmax = next(k for k, v in kinds.items() if v.startswith("softmax"))
        assert kinds[softmax] == "softmax, output"
        backend = UnitBackend(inner, {u.key: u for u in units})
        rows = layer_sensitivity(inner, held) + unit_sensitivity(backend, held)
        ranking = combined_ranking({"tflite": rows})
        assert ranking[0] == softmax  # the most harmful unit alone
        every_layer = score(inner.run(held.x, float_layers=inner.layers), held)
        assert not gate_passes(gate, every_layer)  # every weighted layer float: the softmax still ties the top
        greedy = find_fallback([backend], ranking, held, gate)
        assert greedy.passed and greedy.float_layers[0] == softmax
        pruned, steps = prune_fallback([backend], greedy.float_layers, held, gate)
        assert softmax in pruned and set(pruned) <= set(greedy.float_layers)
        assert len(steps) == len(greedy.float_layers) and all(s["kind"] == "fallback_prune" for s in steps)
        # A unit stays float only when returning it to int8 failed the gate; the pruned set passes.
        for s in steps:
            assert (s["returned_to_int8"] in pruned) == (not s["passed"])
        assert gate_passes(gate, score(backend.run(held.x, float_layers=pruned), held))


def test_qdq_units_are_the_quantized_adds_and_pools(flat_softmax, tmp_path):
    import onnx

    from quantship.convert.onnx import convert_to_onnx, onnx_node_layers
    from quantship.sensitivity.units import qdq_units

    model, _, _ = flat_softmax
    proto = onnx.load(str(convert_to_onnx(model, tmp_path / "m.onnx").path))
    units = qdq_units(proto, onnx_node_layers(proto, model), {la.name for la in model.layers})
    assert {u.key: u.kind for u in units} == {"add:res_add": "add", "pool:gap": "pool"}


def test_a_float_set_takes_the_pads_between_its_ops_along(tmp_path):
    """A Pad (or Reshape) left int8 between float ops rounds its input to int8 and nothing else: MobileNetV2's five
    Pads kept its TFLite model at 14.5 dB from fp32 with every unit float, so no fallback could reach 99 %. A deny
    list takes them along with the ops that read them, on the fast (calibrate-only) and the converter's path."""
    import keras
    import numpy as np

    from quantship.config import IODType
    from quantship.convert.tflite import TfliteConverter, follow_movement
    from quantship.sensitivity import TfliteBackend
    from quantship.sensitivity.units import tflite_units

    keras.utils.set_random_seed(7)
    L = keras.layers
    inputs = keras.Input((32, 32, 3), name="input")
    x = L.ZeroPadding2D(1, name="pad1")(inputs)
    x = L.Conv2D(8, 3, strides=2, activation="relu", name="conv1")(x)
    x = L.ZeroPadding2D(1, name="pad2")(x)
    x = L.DepthwiseConv2D(3, strides=2, name="dw")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    x = L.Dense(10, name="logits", kernel_initializer=keras.initializers.RandomNormal(0, 3))(x)
    model = keras.Model(inputs, L.Activation("softmax", name="probs")(x))  # confident: errors show in the probs
    calib, _ = synthetic_set(4, seed=61)
    held, _ = synthetic_set(3, seed=62)
    calib, held = tf_preprocess(calib), tf_preprocess(held)
    ref = model.predict(held, verbose=0)

    def sqnr(y):
        return 10 * np.log10(float((ref**2).sum() / ((y - ref) ** 2).sum()))

    with TfliteConverter(model, tmp_path / "convert.log", work_dir=tmp_path) as conv:
        fast = TfliteBackend(conv, lambda: [calib])
        graph = fast.cuts()
        pads = [t for k, t in graph.op_kinds if k == "PAD"]
        assert len(pads) == 2 and set(pads) <= set(graph.movement)
        # conv1 float takes pad1 (which it reads) along; dw float takes pad2
        assert set(follow_movement(fast.denylist_nodes(["conv1"]), graph.movement)) & set(pads) == {pads[0]}
        units = [n for u in tflite_units(fast, fast.layers) for n in u.nodes]
        every = fast.denylist_nodes(fast.layers) + units
        # The old deny list (pads left int8): the input is rounded at pad1, conv1's output at pad2.
        old = conv.quantize_calibrated(fast._calibration(), IODType.FLOAT32, float_nodes=every)
        assert sqnr(np.concatenate(fast._run_model(old, [[held]])[0])) < 90
        for backend in (fast, TfliteBackend(conv, lambda: [calib], fast=False)):
            data = backend.model_bytes(set(backend.layers), units)
            assert sqnr(np.concatenate(backend._run_model(data, [[held]])[0])) > 110


def test_weighted_only_is_parsed_and_bad_fallback_input_is_refused_first(capsys):
    """``--weighted-only`` reaches the job through the real parser; a fallback without its gate or data is
    refused with one line and exit 2 before any work."""
    from quantship.cli import build_parser, main

    args = build_parser().parse_args(["convert", "--model", "mobilenet_v2_tv", "--auto-fallback", "--weighted-only"])
    assert args.weighted_only and args.auto_fallback
    assert main(["convert", "--model", "mobilenet_v2_tv", "--auto-fallback", "--weighted-only"]) == 2
    assert "--auto-fallback needs --gate" in capsys.readouterr().err
    args = build_parser().parse_args(["sensitivity", "--model", "m", "--data", "imagenet:x", "--weighted-only"])
    assert args.weighted_only


def test_a_failed_search_reports_the_set_that_came_closest():
    """The set whose worst backend is nearest the gate (smaller set on a tie), not the last one tried."""
    from quantship.config import Gate
    from quantship.sensitivity.fallback import closest_set

    def step(floats, backend, top1):
        return {"kind": "fallback", "backend": backend, "float_layers": floats, "top1": top1, "reference_top1": 1.0}

    steps = [
        *(step([], b, v) for b, v in (("qdq", 0.90), ("tflite", 0.80))),
        *(step(["a"], b, v) for b, v in (("qdq", 0.97), ("tflite", 0.95))),
        *(step(["a", "b"], b, v) for b, v in (("qdq", 0.99), ("tflite", 0.95))),
        *(step(["a", "b", "c"], b, v) for b, v in (("qdq", 0.98), ("tflite", 0.94))),
    ]
    floats, values = closest_set(steps, Gate.parse("top1>=0.99"))
    assert floats == ["a"] and values == {"qdq": 0.97, "tflite": 0.95}
    assert closest_set(steps, Gate.parse("drop<=0.5"))[0] == ["a"]
    assert closest_set([], Gate.parse("top1>=0.99")) is None


def test_movement_ops_follow_their_readers_transitively_and_the_last_one_its_maker():
    from quantship.convert.tflite import follow_movement

    # reshape -> pad -> conv; a Reshape that only the graph output reads follows the op that made its input
    near = {"reshape": ("pad",), "pad": ("conv",), "out_reshape": ("softmax",)}
    assert follow_movement(["conv"], near) == ["conv", "pad", "reshape"]
    assert follow_movement(["softmax", "softmax"], near) == ["softmax", "out_reshape"]
    assert follow_movement(["other"], near) == ["other"]
