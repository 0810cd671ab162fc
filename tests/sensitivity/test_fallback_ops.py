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
