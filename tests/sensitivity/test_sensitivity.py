"""Layer sensitivity, weight-precision studies and automatic float fallback on a model made hostile to
quantization: one channel of conv1's output is 3000x larger (compensated in conv2, so float is unchanged)."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest

from conftest import synthetic_set, tf_preprocess
from quantship.config import Gate, IODType
from quantship.errors import ConfigError
from quantship.sensitivity import (
    HeldOut,
    QdqBackend,
    TfliteBackend,
    depthwise_vs_pointwise,
    find_fallback,
    fixed_point_int8,
    layer_sensitivity,
    layer_types,
    mantissa_truncate,
    sqnr_db,
    weight_study,
)

# ---------------------------------------------------------------------------------------- by hand


def test_mantissa_23_bits_is_bit_identical_and_fewer_bits_truncate():
    w = np.random.default_rng(0).normal(size=1000).astype(np.float32)
    assert mantissa_truncate(w, 23).tobytes() == w.tobytes()
    assert mantissa_truncate(np.float32([1.75]), 1)[0] == 1.5  # 1.11b -> 1.1b
    assert mantissa_truncate(np.float32([-1.75]), 0)[0] == -1.0
    assert mantissa_truncate(np.float32([3.0e-3]), 2)[0] == np.float32(0.0029296875)  # mantissa .10b of 2^-9 * 1.536
    with pytest.raises(ConfigError):
        mantissa_truncate(w, 24)


def test_fixed_point_round_trips_by_hand():
    w = np.array([[0.5, -2.0], [1.27, 0.02]], np.float32)  # (in=2, out=2)
    t = fixed_point_int8(w, per_channel=False)  # scale 2/127
    np.testing.assert_allclose(t, np.array([[32, -127], [81, 1]]) * (2.0 / 127), rtol=1e-6)
    c = fixed_point_int8(w, per_channel=True)  # column scales 1.27/127 and 2/127
    np.testing.assert_allclose(c, np.array([[50 * 0.01, -127 * 2 / 127], [127 * 0.01, 1 * 2 / 127]]), rtol=1e-5)
    assert np.array_equal(fixed_point_int8(t, per_channel=False), t)  # quantized values are a fixed point
    from quantship.sensitivity import weight_variant

    dw = np.zeros((1, 1, 2, 1), np.float32)
    dw[0, 0, :, 0] = [0.01, 1.0]  # a depthwise kernel: channels on axis 2
    np.testing.assert_allclose(weight_variant(dw, "int8-channel", depthwise=True)[0, 0, :, 0], [0.01, 1.0], rtol=1e-6)
    assert weight_variant(dw, "int8-channel")[0, 0, 0, 0] == pytest.approx(1 / 127)  # read as one channel


def test_gate_parsing_and_sqnr():
    assert Gate.parse("top1>=0.99") == Gate(metric="top1", relative=0.99)
    assert Gate.parse("drop<=0.5") == Gate(metric="top1", max_drop_points=0.5)
    assert Gate.parse("top5>=0.995") == Gate(metric="top5", relative=0.995)
    assert Gate.parse("top5-drop<=1") == Gate(metric="top5", max_drop_points=1.0)
    assert Gate.parse("mAP>=0.95") == Gate(metric="mAP", relative=0.95)
    with pytest.raises(ConfigError):
        Gate.parse("accuracy is fine")
    ref = np.ones((4, 3))
    assert sqnr_db(ref, ref) == float("inf")
    assert sqnr_db(ref, ref * 1.1) == pytest.approx(20.0)


# ----------------------------------------------------------------------------------- hostile model


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    import keras

    keras.utils.set_random_seed(2)
    inputs = keras.Input((32, 32, 3), name="input")
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", activation="relu", name="dw")(x)
    x = keras.layers.Conv2D(16, 1, activation="relu", name="pw")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    out = keras.layers.Dense(3, activation="softmax", name="fc")(x)
    model = keras.Model(inputs, out)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
    tx, ty = synthetic_set(60, seed=31)
    model.fit(tf_preprocess(tx), ty, epochs=8, batch_size=32, verbose=0)
    # Make conv1's output channel 0 huge and undo it in conv2: the float function stays the same.
    k, b = model.get_layer("conv1").get_weights()
    live = int(np.argmax(np.abs(k).sum(axis=(0, 1, 2))))
    k[..., live] *= 3000
    b[live] *= 3000
    model.get_layer("conv1").set_weights([k, b])
    k2, b2 = model.get_layer("conv2").get_weights()
    k2[:, :, live, :] /= 3000
    model.get_layer("conv2").set_weights([k2, b2])
    cx, _ = synthetic_set(10, seed=32)
    ex, ey = synthetic_set(30, seed=33)
    calib, x = tf_preprocess(cx), tf_preprocess(ex)
    held = HeldOut(x, ey, model.predict(x, verbose=0))
    assert (held.reference.argmax(1) == ey).mean() >= 0.9
    return model, calib, held


@pytest.fixture(scope="module")
def qdq_backend(hostile, tmp_path_factory):
    import onnx

    from quantship.calibrate.api import calibrate
    from quantship.convert.calibrated import collect_statistics
    from quantship.convert.onnx import convert_to_onnx, onnx_node_layers

    model, calib, _ = hostile
    art = convert_to_onnx(model, tmp_path_factory.mktemp("h") / "h.onnx")
    proto = onnx.load(str(art.path))
    amax = calibrate(
        collect_statistics(proto, [calib[i : i + 10] for i in range(0, len(calib), 10)], scope="qdq"), "max"
    ).amax
    return QdqBackend(proto, amax, onnx_node_layers(proto, model))


GATE = Gate(metric="top1", relative=0.99)


@pytest.mark.slow
def test_qdq_ranking_puts_the_hostile_layer_first(qdq_backend, hostile):
    _, _, held = hostile
    assert qdq_backend.layers == ["conv1", "conv2", "dw", "pw", "fc"]
    rows = layer_sensitivity(qdq_backend, held)
    assert rows[0]["layer"] == "conv2" and rows[0]["rank"] == 1  # its input is the hostile activation
    assert rows[0]["sqnr_db"] == min(r["sqnr_db"] for r in rows)
    assert rows[0]["agreement_top1"] < 0.9 and all(r["agreement_top1"] >= 0.95 for r in rows[1:])
    cumulative = layer_sensitivity(qdq_backend, held, cumulative=True)
    assert [r["quantized_layers"] for r in cumulative] == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_screening_scores_only_harmless_layers_on_half_the_images(qdq_backend, hostile):
    """The screening rule: a layer that changes nothing on every other image is scored on those only; every
    other layer on all images, with the full study's numbers, so the harmful end of the ranking is unchanged."""
    from quantship.sensitivity.scoring import shows_no_harm

    _, _, held = hostile
    n = len(held.x)
    full = layer_sensitivity(qdq_backend, held)
    screened = layer_sensitivity(qdq_backend, held, screen_min=10)
    half = {r["layer"] for r in screened if r["screened"]}
    assert half and "conv2" not in half and {r["images"] for r in screened if r["screened"]} == {(n + 1) // 2}
    on_half = {r["layer"]: r for r in layer_sensitivity(qdq_backend, held.subset(range(0, n, 2)))}
    assert all(shows_no_harm(on_half[layer]) for layer in half)
    kept = [r for r in screened if not r["screened"]]
    assert [r["layer"] for r in kept] == [r["layer"] for r in full][: len(kept)]
    for r, f in zip(kept, full):
        assert r["images"] == n and r["agreement_top1"] == f["agreement_top1"]
        assert r["sqnr_db"] == pytest.approx(f["sqnr_db"], abs=1e-3)


@pytest.mark.slow
def test_qdq_layers_share_their_prefix_and_give_the_same_outputs(qdq_backend, hostile):
    """One layer (or layers 0..k) quantized, the prefix computed once: the same outputs as one model per row."""
    _, _, held = hostile
    layers = qdq_backend.layers
    for cumulative in (False, True):
        shared = qdq_backend.run_layers(held.x, layers, cumulative)
        for k, layer in enumerate(layers):
            only = layers[: k + 1] if cumulative else [layer]
            np.testing.assert_allclose(shared[k], qdq_backend.run(held.x, only=only), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_qdq_fallback_keeps_exactly_the_hostile_layer(qdq_backend, hostile):
    _, _, held = hostile
    ranking = [r["layer"] for r in layer_sensitivity(qdq_backend, held.subset(range(0, 90, 2)))]
    result = find_fallback([qdq_backend], ranking, held.subset(range(1, 90, 2)), GATE)
    assert result.passed and result.float_layers == ["conv2"]
    assert not result.steps[0]["passed"]  # the plain int8 model fails the gate


@pytest.mark.slow
def test_tflite_ranking_and_fallback(hostile, tmp_path):
    from quantship.convert.tflite import TfliteConverter

    model, calib, held = hostile
    with TfliteConverter(model, tmp_path / "convert.log") as conv:
        backend = TfliteBackend(conv, lambda: [calib])
        rows = layer_sensitivity(backend, held)
        # In TFLite the hostile tensor (conv1's output) is quantized whichever of its two ops is int8: conv1
        # quantizes its output, and an int8 conv2 after a float conv1 gets a QUANTIZE op on its input.
        assert {rows[0]["layer"], rows[1]["layer"]} == {"conv1", "conv2"}
        assert all(r["agreement_top1"] < 0.9 for r in rows[:2]) and all(r["agreement_top1"] >= 0.95 for r in rows[2:])
        result = find_fallback([backend], [r["layer"] for r in rows], held, GATE)
    assert result.passed and sorted(result.float_layers) == ["conv1", "conv2"]
    assert [s["passed"] for s in result.steps] == [False, False, True]


@pytest.mark.slow
def test_tflite_fast_path_gives_the_slow_paths_numbers_and_rankings(hostile, tmp_path):
    """One calibration, then only quantization per variant: exactly what converting every variant gives."""
    from quantship.convert.tflite import TfliteConverter

    model, calib, held = hostile
    with TfliteConverter(model, tmp_path / "convert.log") as conv:
        fast, slow = TfliteBackend(conv, lambda: [calib]), TfliteBackend(conv, lambda: [calib], fast=False)
        fast_rows, slow_rows = layer_sensitivity(fast, held), layer_sensitivity(slow, held)
        assert [r["layer"] for r in fast_rows] == [r["layer"] for r in slow_rows]
        for f, s in zip(fast_rows, slow_rows):
            assert f["agreement_top1"] == s["agreement_top1"] and f["sqnr_db"] == pytest.approx(s["sqnr_db"], abs=1e-6)
        np.testing.assert_array_equal(fast.run(held.x, only=["conv1", "dw"]), slow.run(held.x, only=["conv1", "dw"]))
        # The study runs LiteRT on every core: the thread count does not change an output.
        one, two = (TfliteBackend(conv, lambda: [calib], threads=t) for t in (1, 2))
        np.testing.assert_array_equal(one.run(held.x, only=["conv1", "dw"]), two.run(held.x, only=["conv1", "dw"]))


@pytest.mark.slow
def test_tflite_variants_start_at_their_layer_and_give_the_same_outputs(tmp_path):
    """Each TFLite variant is cut out of the calibrate-only model at its layer and fed the values alive there
    (float, or row k-1's for the cumulative rows): the whole variant's outputs, bit for bit, also where a residual
    branch keeps two tensors alive at a cut."""
    import keras

    from quantship.convert.tflite import TfliteConverter

    keras.utils.set_random_seed(7)
    L = keras.layers
    inputs = keras.Input((16, 16, 3), name="input")
    x = L.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(inputs)
    y = L.Conv2D(8, 1, activation="relu", name="conv2")(x)
    y = L.DepthwiseConv2D(3, padding="same", name="dw")(y)
    x = L.GlobalAveragePooling2D(name="gap")(L.Add(name="add")([x, y]))
    model = keras.Model(inputs, L.Dense(4, activation="softmax", name="fc")(x))
    rng = np.random.default_rng(0)
    calib, x = (rng.normal(size=(n, 16, 16, 3)).astype(np.float32) for n in (8, 12))
    with TfliteConverter(model, tmp_path / "convert.log", work_dir=tmp_path) as conv:
        backend = TfliteBackend(conv, lambda: [calib])
        cuts = backend.cuts()
        assert len(cuts.live(cuts.position["dw"])) == 2  # conv1's output waits there for the add
        # Deny lists named from the calibrate-only model are the converter's (named from its float model).
        assert all(backend.nodes_outside(o) == conv.nodes_outside(o) for o in (["dw"], ["conv1", "fc"]))
        # Float layers' deny lists too: the same int8 model as with the float model's tensor names.
        assert set(backend.denylist_nodes(["dw"])) == set(conv.denylist_nodes(["dw"])) & set(conv.op_outputs())
        whole = conv.denylist_nodes(["dw"])
        assert backend.model_bytes({"dw"}) == conv.quantize_calibrated(
            backend._calibration(), IODType.FLOAT32, float_nodes=whole
        )
        for cumulative in (False, True):
            shared = backend.run_layers(x, backend.layers, cumulative)
            for k, layer in enumerate(backend.layers):
                only = backend.layers[: k + 1] if cumulative else [layer]
                np.testing.assert_array_equal(shared[k], backend.run(x, only=only))


@pytest.mark.slow
def test_depthwise_vs_pointwise_and_weight_study(qdq_backend, hostile):
    model, _, held = hostile
    before = [w.copy() for w in model.get_weights()]
    types = layer_types(model)
    assert types == {"conv1": "conv", "conv2": "conv", "dw": "depthwise", "pw": "pointwise", "fc": "dense"}
    rows = depthwise_vs_pointwise(qdq_backend, held, types)
    assert [r["quantized_layers"] for r in rows] == [2, 5]
    study = weight_study(
        model,
        held,
        ["fp16", "int8-channel", "mantissa:23", "mantissa:1"],
        per_layer=True,
        recipe={"conv1": "fp16", "fc": "int8-tensor"},
    )
    by = {(r["precision"], r["layers"]): r for r in study}
    assert by[("mantissa:23", "all")]["sqnr_db"] == float("inf")  # bit-identical weights
    assert by[("fp16", "all")]["agreement_top1"] == 1.0
    assert by[("mantissa:1", "all")]["sqnr_db"] < by[("fp16", "all")]["sqnr_db"]
    assert ("int8-channel", "conv1") in by and ("recipe", "mixed") in by
    assert all(len(r["prediction_check"]) == 3 for r in study)
    # Weights are restored bit for bit; outputs at another batch size may differ in the last bit (the kernels
    # block differently on some CPUs), so they are compared with a tolerance.
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), before))
    np.testing.assert_allclose(model.predict(held.x[:4], verbose=0), held.reference[:4], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_cli_auto_fallback_and_sensitivity_report(hostile, tmp_path):
    import json
    import subprocess
    import sys

    from conftest import write_synset_dataset

    model, _, _ = hostile
    path = tmp_path / "hostile.keras"
    model.save(path)
    data = write_synset_dataset(tmp_path / "data", 24, seed=41)
    common = [
        "--model",
        str(path),
        "--preprocess",
        "mode=tf,size=32,crop_pct=1.0",
        "--data",
        f"imagenet:{data}",
        "--calib-images",
        "12",
    ]
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "quantship",
            "convert",
            *common,
            "--auto-fallback",
            "--gate",
            "top1>=0.99",
            "--fallback-images",
            "60",
            "--out",
            str(tmp_path / "fb"),
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    assert "int8+fallback" in res.stdout and "agreement " in res.stdout  # the cost lines show agreement with fp32
    rows = [json.loads(line) for line in (tmp_path / "fb" / "fallback.jsonl").read_text().splitlines()]
    costs = {(r["backend"], r["variant"]): r for r in rows if r["kind"] == "fallback_cost"}
    assert costs[("qdq", "int8+fallback")]["float_layers"] == ["conv2", "conv1"]
    # The op units (TFLite's softmax, pooling) were ranked with the layers, and the greedy set was pruned.
    units = {r["layer"]: r["unit_kind"] for r in rows if r["kind"] == "single" and "unit_kind" in r}
    assert "pool:gap" in units.keys() and any(kind.startswith("softmax") for kind in units.values())
    assert [r for r in rows if r["kind"] == "fallback_prune"]
    for backend in ("qdq", "tflite"):
        assert costs[(backend, "int8+fallback")]["agreement_top1"] > costs[(backend, "int8")]["agreement_top1"]
        assert Path(costs[(backend, "int8+fallback")]["artifact"]).is_file()

    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "quantship",
            "sensitivity",
            *common,
            "--images",
            "60",
            "--backend",
            "qdq",
            "--cumulative",
            "--weight-study",
            "fp16,mantissa:8",
            "--out",
            str(tmp_path / "s"),
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    # The cumulative study runs on the ranking half (every other image), and its rows and the console say so.
    study = [json.loads(line) for line in (tmp_path / "s" / "sensitivity.jsonl").read_text().splitlines()]
    assert {r["images"] for r in study if r["kind"] == "cumulative"} == {30}
    assert {r["images"] for r in study if r["kind"] == "single"} == {60}
    assert "cumulative/depthwise studies on every other held-out image (30)" in res.stderr + res.stdout
    page = (tmp_path / "s" / "report.html").read_text()
    # The one picture is the per-layer harm chart (a real PNG); the tables are there.
    (png,) = [p.split("'")[0] for p in page.split("alt='per-layer harm' src='data:image/png;base64,")[1:]]
    assert base64.b64decode(png)[:8] == b"\x89PNG\r\n\x1a\n"
    assert page.count("data:image/png;base64,") == 1 and "Cumulative" in page and "mantissa:8" in page
    assert (tmp_path / "s" / "sensitivity_chart.png").read_bytes() == base64.b64decode(png)


def test_gates_check_the_metric_they_name():
    """A top5 gate is evaluated on top-5 (it was evaluated on top-1)."""
    from quantship.sensitivity import gate_passes

    metrics = {"metric": "top1", "top1": 0.50, "reference_top1": 0.80, "top5": 0.90, "reference_top5": 0.91}
    assert gate_passes(Gate.parse("top5>=0.98"), metrics) and not gate_passes(Gate.parse("top1>=0.98"), metrics)
    assert not gate_passes(Gate.parse("top5-drop<=0.5"), metrics) and gate_passes(Gate.parse("top5-drop<=2"), metrics)


@pytest.mark.slow
def test_fallback_passes_only_when_every_backend_passes(qdq_backend, hostile):
    """One float set for all backends, and the result is a pass only if every backend passes with it: here a
    second Q/DQ model whose last layer's input range is broken can never pass with one float layer, while the
    first passes (convert --auto-fallback exited 0 in such a case when the TFLite model passed)."""
    _, _, held = hostile
    broken = QdqBackend(qdq_backend.model, dict(qdq_backend.amax), qdq_backend.node_layers)
    fc_input = next(n.input[0] for n in qdq_backend.model.graph.node if qdq_backend.node_layers.get(n.name) == "fc")
    broken.amax[fc_input] = 1e-4
    broken.name = "qdq-broken"
    result = find_fallback([qdq_backend, broken], ["conv2", "conv1"], held, GATE, max_layers=1)
    last = {s["backend"]: s["passed"] for s in result.steps if s["float_layers"] == ["conv2"]}
    assert last == {"qdq": True, "qdq-broken": False} and not result.passed


def test_a_relative_gate_against_an_fp32_score_of_zero_is_refused():
    """Photo folders labelled 0 give fp32 a top-1 of 0: 'top1>=0.99' could never pass, and the search walked every
    layer and op unit to find that out (46 min on Lite0). It is one line before the search now."""
    from quantship.sensitivity.scoring import check_gate_reference

    reference = np.eye(3, dtype=np.float32)[[0, 1, 0, 1]]
    unlabelled = HeldOut(np.zeros((4, 1)), [2, 2, 2, 2], reference)
    with pytest.raises(ConfigError, match="agreement_top1"):
        check_gate_reference(Gate.parse("top1>=0.99"), unlabelled)
    check_gate_reference(Gate.parse("agreement_top1>=0.99"), unlabelled)
    check_gate_reference(Gate.parse("top1>=0.99"), HeldOut(np.zeros((4, 1)), [0, 1, 0, 2], reference))
