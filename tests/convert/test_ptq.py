"""Post-training steps on the Keras model (batch-norm folding, cross-layer equalization, bias correction) and the
per-layer choice of calibration method."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import TINY_PREPROCESS, block_model
from quantship.config import PtqSteps
from quantship.convert.ptq import (
    bias_correction,
    biased_layers,
    equalization_pairs,
    fold_batch_norms,
    input_means,
    max_abs_difference,
    per_channel_int8,
    prepare_model,
)
from quantship.errors import ConfigError


def relu_model():
    """Every link equalization is exact through: ReLU, a linear link, ReLU + global pooling into a dense layer;
    channels with very different weight ranges, batch norms with real statistics."""
    import keras

    keras.utils.set_random_seed(5)
    L = keras.layers
    inputs = keras.Input((12, 12, 3), name="input")
    x = L.Conv2D(8, 3, padding="same", name="c1")(inputs)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.ReLU(name="r1")(x)
    x = L.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(x)
    x = L.BatchNormalization(name="bn2")(x)
    x = L.ReLU(name="r2")(x)
    x = L.Conv2D(6, 1, use_bias=False, name="pw1")(x)
    x = L.BatchNormalization(name="bn3")(x)
    x = L.Conv2D(10, 1, name="pw2")(x)
    x = L.ReLU(name="r3")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    out = L.Dense(4, name="logits")(x)
    model = keras.Model(inputs, out, name="relus")
    rng = np.random.default_rng(0)
    for layer in model.layers:
        w = layer.get_weights()
        if isinstance(layer, L.BatchNormalization):
            n = w[0].shape[0]
            layer.set_weights(
                [rng.uniform(0.5, 2, n), rng.normal(0, 0.3, n), rng.normal(0, 0.3, n), rng.uniform(0.5, 2, n)]
            )
        elif w:  # spread the channels' ranges over two orders of magnitude
            k = w[0] * np.exp(rng.uniform(-2.3, 2.3, w[0].shape[-1]))
            layer.set_weights([k.astype(np.float32), *w[1:]])
    return model


@pytest.fixture(scope="module")
def x12():
    return np.random.default_rng(1).normal(size=(6, 12, 12, 3)).astype(np.float32)


def test_folding_is_exact_and_keeps_layer_names(x12):
    model = relu_model()
    folded, bns = fold_batch_norms(model)
    assert bns == ["bn1", "bn2", "bn3"]
    assert [layer.name for layer in folded.layers] == [
        "input",
        "c1",
        "r1",
        "dw",
        "r2",
        "pw1",
        "pw2",
        "r3",
        "gap",
        "logits",
    ]
    assert folded.get_layer("dw").use_bias and folded.get_layer("pw1").use_bias
    assert max_abs_difference(model, folded, x12) < 1e-4
    assert model.get_layer("bn1") is not None  # the original is untouched: it stays the fp32 reference


def test_equalization_is_exact_through_relu_and_equalizes_the_ranges(x12):
    model = relu_model()
    prepared, report = prepare_model(model, PtqSteps(equalize=True))
    assert sorted(report.pairs) == sorted([("c1", "dw"), ("dw", "pw1"), ("pw1", "pw2"), ("pw2", "logits")])
    assert report.range_ratio_before > 3 and report.range_ratio_after < 1.01
    assert max_abs_difference(model, prepared, x12) < 1e-4
    r1 = np.abs(prepared.get_layer("dw").get_weights()[0]).max(axis=(0, 1, 3))  # dw output channels
    r2 = np.abs(prepared.get_layer("pw1").get_weights()[0]).max(axis=(0, 1, 3))  # pw1 input channels
    np.testing.assert_allclose(r1, r2, rtol=0.02)


def test_relu6_links_are_left_alone_or_made_relu_as_published():
    model = block_model()
    keep, report = prepare_model(model, PtqSteps(equalize=True))
    assert report.pairs == [] and report.relu6_replaced == []  # only ReLU6 links here: nothing exact to do
    relu, report = prepare_model(model, PtqSteps(equalize=True, relu6="relu"))
    assert report.pairs == [("stem_conv", "dwconv")] and report.relu6_replaced == ["stem_relu6"]
    assert relu.get_layer("stem_relu6").get_config()["max_value"] is None
    assert relu.get_layer("dw_relu6").get_config()["max_value"] == 6.0  # not between two equalized layers
    assert [(p.first, p.second, p.relu6) for p in equalization_pairs(fold_batch_norms(model)[0])] == [
        ("stem_conv", "dwconv", "stem_relu6")
    ]
    with pytest.raises(ConfigError, match="relu6 mode"):
        PtqSteps(equalize=True, relu6="clip")
    assert PtqSteps(equalize=True, relu6="calibration").label == "equalize-calibration"


def test_equalization_through_relu6_is_exact_on_the_calibration_images():
    """ReLU6 kept: a channel that reaches 6 on the calibration images keeps its scale, the others move only as far
    as the clip stays out of reach, so the model is unchanged on those images."""
    from quantship.convert.ptq import relu6_maxima

    model = block_model()
    x = np.random.default_rng(2).normal(0, 3, size=(8, 24, 24, 3)).astype(np.float32)
    folded, _ = fold_batch_norms(model)
    maxima = relu6_maxima(folded, equalization_pairs(folded), [x])["stem_conv"]
    assert (maxima >= 6).any() and (maxima < 6).any()  # both kinds of channel
    for mode in ("keep", "calibration"):
        prepared, report = prepare_model(model, PtqSteps(equalize=True, relu6=mode), lambda: [x[:4], x[4:]])
        assert report.pairs == [("stem_conv", "dwconv")] and report.relu6_pairs == 1
        assert report.relu6_channels_at_clip == int((maxima >= 6).sum())
        assert max_abs_difference(model, prepared, x) < 1e-5
        w0, w1 = (np.abs(m.get_layer("stem_conv").get_weights()[0]).max(axis=(0, 1, 2)) for m in (folded, prepared))
        np.testing.assert_allclose(w1[maxima >= 6], w0[maxima >= 6], rtol=1e-6)  # clipped channels keep s = 1
        if mode == "keep":  # only scaled up (W1's channel grows), by at most 6 / (2 m)
            ratio = w1[maxima < 6] / w0[maxima < 6]
            assert (ratio >= 1 - 1e-6).all() and (ratio <= np.maximum(1, 3 / maxima[maxima < 6]) + 1e-6).all()
        else:
            assert not np.allclose(w1[maxima < 6], w0[maxima < 6])


def test_bias_correction_removes_the_mean_shift_of_int8_weights(x12):
    """On a 1x1 convolution the expected output shift E[(W_q - W) x] is exact: after correction the int8-weight
    layer's mean output per channel equals the float layer's."""
    import keras

    folded, _ = fold_batch_norms(relu_model())
    layer = folded.get_layer("pw2")
    probe = keras.Model(folded.inputs, layer.output)
    means = input_means(folded, biased_layers(folded), [x12[:3], x12[3:]])
    assert set(means) == {"c1", "dw", "pw1", "pw2", "logits"} and means["dw"].shape == (8,)

    def mean_shift() -> np.ndarray:
        w = layer.get_weights()
        y = np.asarray(probe(x12)).reshape(-1, w[0].shape[-1]).mean(0)
        layer.set_weights([per_channel_int8(w[0], False), w[1]])
        yq = np.asarray(probe(x12)).reshape(-1, w[0].shape[-1]).mean(0)
        layer.set_weights(w)
        return yq - y

    before = mean_shift()
    delta = bias_correction(folded, {"pw2": means["pw2"]})["pw2"]
    np.testing.assert_allclose(delta, -before, rtol=1e-3, atol=1e-6)
    w = layer.get_weights()
    layer.set_weights([w[0], w[1] + delta])
    after = mean_shift() + delta  # the corrected int8 layer against the uncorrected float one
    assert np.abs(after).max() < 1e-3 * np.abs(before).max() + 1e-6


def test_depthwise_correction_is_per_channel():
    folded, _ = fold_batch_norms(relu_model())
    mean = np.linspace(0.1, 0.8, 8)
    k = folded.get_layer("dw").get_weights()[0]
    err = per_channel_int8(k, True).astype(np.float64) - k
    got = bias_correction(folded, {"dw": mean})["dw"]
    np.testing.assert_allclose(got, -err.sum(axis=(0, 1))[:, 0] * mean, rtol=1e-6)


def test_auto_chooses_the_candidate_with_the_smallest_layer_error():
    """A conv input with rare huge outliers: the max range wastes the int8 levels, so auto clips; every tensor's
    choice is the argmin of its measured errors and its range is that method's."""
    import onnx
    from onnx import helper, numpy_helper

    from quantship.calibrate.api import calibrate
    from quantship.convert.calibrated import collect_statistics

    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 4, 1, 1)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv"), helper.make_node("Relu", ["y"], ["z"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 4, 16, 16])],
        [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [None, 4, 16, 16])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    batches = []
    for _ in range(4):
        x = rng.normal(size=(4, 4, 16, 16)).astype(np.float32)
        x.flat[rng.integers(0, x.size, 3)] = 60.0
        batches.append(x)
    collector = collect_statistics(model, batches, scope="all")
    auto = calibrate(collector, "auto")
    described = auto.calibrator.describe()
    assert described["method"] == "auto" and described["chosen"]["x"] != "max"
    for method in ("max", "entropy", "percentile", "mse"):
        if described["chosen"]["x"] == method:
            assert auto.amax["x"] == calibrate(collector, method).amax["x"]
    assert sum(described["chosen_counts"].values()) == len(auto.amax)


@pytest.mark.slow
def test_eval_with_post_training_steps_and_auto_records_them(trained_tiny, synset_dataset, tmp_path):
    from quantship.config import CalibrationSpec
    from quantship.config import parse_preprocess_overrides as ppo
    from quantship.jobs.eval import EvalSpec, run_eval

    _, model_path = trained_tiny
    spec = EvalSpec(
        model=str(model_path),
        data=f"imagenet:{synset_dataset}",
        targets=["keras-fp32", "tflite-fp32", "tflite-int8", "tflite-int8-auto", "qdq-int8-auto"],
        out_dir=tmp_path,
        limit=24,
        calibration=CalibrationSpec(num_images=12),
        preprocess_overrides=ppo(TINY_PREPROCESS),
        ptq=PtqSteps(equalize=True, bias_correct=True),
    )
    rows = {r["target"]: r for r in run_eval(spec).rows}
    assert all(r["agreement_top1"] >= 0.9 for r in rows.values())
    manifests = {t: json.loads(open(r["manifest"]).read()) for t, r in rows.items() if r["manifest"]}
    assert "post_training" not in manifests["tflite-fp32"]  # float targets convert the model as it is
    for t in ("tflite-int8", "tflite-int8-auto", "qdq-int8-auto"):
        post = manifests[t]["post_training"]
        assert post["equalize"] and post["bias_correct"] and post["bias_corrected_layers"] == 4
        assert post["equalized_pairs"] == 3  # conv1 -> dw1 -> pw1 -> (gap) -> logits, all through ReLU
    assert "+equalize+bias-correct" in rows["tflite-int8"]["artifact"]
    assert manifests["tflite-int8-auto"]["calibrator"]["method"] == "auto"
    assert manifests["qdq-int8-auto"]["calibration_method"]["method"] == "auto"


def test_weight_study_shows_the_steps(trained_tiny):
    from conftest import synthetic_set, tf_preprocess
    from quantship.sensitivity import HeldOut, weight_study

    model, _ = trained_tiny
    x, y = synthetic_set(4, seed=21)
    x = tf_preprocess(x)
    held = HeldOut(x, list(y), np.asarray(model(x)))
    rows = weight_study(
        model, held, ["int8-tensor"], ptq=PtqSteps(equalize=True, bias_correct=True), calib_batches=lambda: [x]
    )
    assert [(r["precision"], r["post_training"]) for r in rows] == [
        ("int8-tensor", "none"),
        ("int8-tensor", "equalize+bias-correct"),
    ]
    assert rows[1]["post_training_report"]["equalized_pairs"] == 3


def test_demo_pass_rule_judges_only_photos_where_fp32_is_confident():
    from quantship.jobs.demo import prediction_check

    fp32 = np.asarray([[0.9, 0.05, 0.05], [0.4, 0.35, 0.25]])  # confident on the first photo only
    same = np.asarray([[0.6, 0.3, 0.1], [0.1, 0.8, 0.1]])  # differs only where fp32 is not confident
    check, ok, rows = prediction_check(["a", "b"], {"keras-fp32": fp32, "int8-a": same})
    assert ok and any("not judged" in line and "b (fp32 top-1" in line for line in check)
    assert [(r["photo"], r["judged"], r["ok"]) for r in rows if r["target"] == "int8-a"] == [
        ("a", True, True),
        ("b", False, True),
    ]
    other = np.asarray([[0.3, 0.6, 0.1], [0.4, 0.35, 0.25]])
    check, ok, rows = prediction_check(["a", "b"], {"keras-fp32": fp32, "int8-b": other})
    assert not ok and any(line.strip().startswith("BAD int8-b") for line in check)


def test_demo_with_no_confident_photo_does_not_pass():
    from quantship.jobs.demo import _verdict

    ok, text = _verdict(True, [{"photo": "a", "judged": False}, {"photo": "b", "judged": False}], 2)
    assert not ok and "the 0 of 2 photos" in text
    ok, text = _verdict(True, [{"photo": "a", "judged": True}, {"photo": "b", "judged": False}], 2)
    assert ok and "the 1 of 2 photos where fp32 is confident (p > 0.5: a)" in text
