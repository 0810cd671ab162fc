"""ONNX export, ONNX Runtime runner, the statistics pass, TensorRT cache and the Q/DQ model."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_PREPROCESS, synthetic_set, tf_preprocess
from quantship.calibrate.api import calibrate
from quantship.calibrate.trt_cache import CalibrationCache, read_cache, write_cache
from quantship.convert.calibrated import CalibrationOutputs, collect_statistics, write_outputs
from quantship.convert.layer_names import segment_layer
from quantship.convert.onnx import OnnxSpec, convert_to_onnx, onnx_node_layers
from quantship.convert.qdq import insert_qdq, quantize_weight
from quantship.errors import CalibrationError, ConfigError, RuntimeBackendError
from quantship.runtime.onnxruntime import OnnxRunner

# ------------------------------------------------------------------------------ cache format (fast)


def test_cache_round_trip_is_bit_exact(tmp_path):
    rng = np.random.default_rng(0)
    scales = {f"layer_{i}/out:0": float(np.float32(s)) for i, s in enumerate(rng.uniform(1e-4, 1.0, 50))}
    scales["input"] = float(np.float32(1 / 127))
    cache = CalibrationCache("EntropyCalibration2", scales)
    path = write_cache(tmp_path / "c.cache", cache)
    text = path.read_text()
    assert text.splitlines()[0] == "TRT-100161-EntropyCalibration2"
    back = read_cache(path)
    assert back.algorithm == "EntropyCalibration2" and back.version == "100161"
    assert {k: struct.pack(">f", v) for k, v in back.scales.items()} == {
        k: struct.pack(">f", v) for k, v in scales.items()
    }
    assert write_cache(tmp_path / "again.cache", back).read_bytes() == path.read_bytes()


def test_cache_hex_is_big_endian_float_bits(tmp_path):
    path = write_cache(tmp_path / "c.cache", CalibrationCache("MinMaxCalibration", {"x": 1.0}))
    assert path.read_text().splitlines()[1] == "x: 3f800000"
    assert CalibrationCache.from_amax({"x": 127.0}, "MinMaxCalibration").dynamic_ranges()["x"] == pytest.approx(127.0)


@pytest.mark.parametrize(
    "text,match",
    [("", "empty"), ("TRT-x\nfoo: 00000000\n", "header"), ("TRT-8601-EntropyCalibration2\nfoo 3f800000\n", ":2")],
)
def test_bad_cache_files(tmp_path, text, match):
    p = tmp_path / "bad.cache"
    p.write_text(text)
    with pytest.raises(CalibrationError, match=match):
        read_cache(p)


def test_weight_quantization_by_hand():
    w = np.array([[[[0.5]], [[-1.0]]], [[[0.0]], [[0.0]]], [[[2.54]], [[1.27]]]], np.float32)  # (3, 2, 1, 1)
    q, scale = quantize_weight(w, axis=0)
    np.testing.assert_allclose(scale, [1.0 / 127, 1.0, 2.54 / 127], rtol=1e-6)
    np.testing.assert_array_equal(q[:, :, 0, 0], [[64, -127], [0, 0], [127, 64]])  # 63.5 rounds to even


def test_keras_layer_names_from_tf2onnx_nodes():
    layers = {"conv1", "block_1_depthwise", "block_1"}
    assert segment_layer("model_1/block_1_depthwise_1/depthwise", layers) == "block_1_depthwise"
    assert segment_layer("model_1/conv1_1/Conv2D", layers) == "conv1"
    assert segment_layer("model_1/other/Relu", layers) is None


# --------------------------------------------------------------------------- with a trained model


@pytest.fixture(scope="module")
def onnx_model(trained_tiny, tmp_path_factory):
    model, _ = trained_tiny
    out = tmp_path_factory.mktemp("onnx")
    art = convert_to_onnx(model, out / "tiny.onnx", OnnxSpec(opset=17))
    return model, art


@pytest.fixture(scope="module")
def sets():
    calib_x, _ = synthetic_set(12, seed=21)
    eval_x, eval_y = synthetic_set(20, seed=22)
    return tf_preprocess(calib_x), tf_preprocess(eval_x), eval_y


def _batches(x, n=6):
    return [x[i : i + n] for i in range(0, len(x), n)]


@pytest.mark.slow
def test_onnx_matches_keras_and_is_checked(onnx_model, sets):
    import onnx

    model, art = onnx_model
    onnx.checker.check_model(onnx.load(str(art.path)))
    assert art.manifest["opset"] == 17
    x = sets[1]
    with OnnxRunner(art.path, num_threads=1) as r:
        got = r.infer(x)["output"]
        assert r.active_providers == ["CPUExecutionProvider"]
    np.testing.assert_allclose(got, model.predict(x, verbose=0), atol=1e-5)


@pytest.mark.slow
def test_fixed_batch_export(trained_tiny, tmp_path):
    art = convert_to_onnx(trained_tiny[0], tmp_path / "b4.onnx", OnnxSpec(batch=4))
    with OnnxRunner(art.path) as r:
        assert r.input_metadata()[0].shape == (4, 32, 32, 3)
        with pytest.raises(RuntimeBackendError, match="inference failed|wrong shape"):
            r.infer(np.zeros((2, 32, 32, 3), np.float32))


def test_missing_provider_is_an_error(tmp_path):
    p = tmp_path / "m.onnx"
    p.write_bytes(b"x")
    with pytest.raises(RuntimeBackendError, match="TensorrtExecutionProvider.*not available"):
        OnnxRunner(p, providers=["tensorrt"]).activate()


def test_corrupt_onnx_is_clear(tmp_path):
    p = tmp_path / "m.onnx"
    p.write_bytes(b"\x08\x07garbage")
    with pytest.raises(RuntimeBackendError, match="cannot load"):
        OnnxRunner(p).activate()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["max", "entropy", "percentile", "mse"])
def test_qdq_model_keeps_top1_agreement(onnx_model, sets, method, tmp_path):
    model, art = onnx_model
    calib, x, y = sets
    collector = collect_statistics(art.path, _batches(calib), scope="qdq")
    result = calibrate(collector, method)
    report = write_outputs(result, art.path, CalibrationOutputs(qdq=tmp_path / "q.onnx"))
    assert len(report.quantized) == 5  # conv1, dw1, pw1, the global average pool and the dense layer (MatMul)
    assert not report.unknown_ops
    import onnx

    q = onnx.load(str(tmp_path / "q.onnx"))
    ops = [n.op_type for n in q.graph.node]
    assert ops.count("QuantizeLinear") >= 4 and ops.count("DequantizeLinear") >= 8
    weight_dq = [n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("_quantized")]
    assert weight_dq and all(any(a.name == "axis" for a in n.attribute) for n in weight_dq)
    with OnnxRunner(art.path) as fp, OnnxRunner(tmp_path / "q.onnx") as qr:
        ref, got = fp.infer(x)["output"], qr.infer(x)["output"]
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.95
    assert not np.allclose(got, ref, atol=1e-6)  # it really is quantized


@pytest.mark.slow
def test_exclusion_by_keras_layer_name(onnx_model, sets, tmp_path):
    model, art = onnx_model
    collector = collect_statistics(art.path, _batches(sets[0]), scope="qdq")
    result = calibrate(collector, "max")
    import onnx

    m = onnx.load(str(art.path))
    node_layers = onnx_node_layers(m, model)
    assert sorted(node_layers.values()) == [
        "conv1",
        "dw1",
        "logits",
        "pw1",
    ]  # tf2onnx names the depthwise node "Conv__N"
    q, report = insert_qdq(m, result.amax, exclude=["dw1"], node_layers=node_layers)
    assert len(report.excluded) == 1 and node_layers[report.excluded[0]] == "dw1"
    assert len(report.quantized) == 4


@pytest.mark.slow
def test_unknown_op_is_left_in_float_and_reported(onnx_model, sets):
    import onnx
    from onnx import helper

    _, art = onnx_model
    m = onnx.load(str(art.path))
    # Put an op the pass does not know (Hardmax) on the output.
    out = m.graph.output[0].name
    for node in m.graph.node:
        for i, name in enumerate(node.output):
            if name == out:
                node.output[i] = "pre_hardmax"
    m.graph.node.append(helper.make_node("Hardmax", ["pre_hardmax"], [out], name="odd_op"))
    collector = collect_statistics(m, _batches(sets[0]), scope="qdq")
    _, report = insert_qdq(m, calibrate(collector, "max").amax)
    assert ("Hardmax", "odd_op") in report.unknown_ops
    assert any("Hardmax" in line for line in report.lines())


@pytest.mark.slow
def test_feed_errors_are_clear(onnx_model):
    _, art = onnx_model
    with pytest.raises(CalibrationError, match="empty"):
        collect_statistics(art.path, [])
    with pytest.raises(CalibrationError, match=r"shape \(2, 3, 32, 32\).*\(N, 32, 32, 3\)"):
        collect_statistics(art.path, [np.zeros((2, 3, 32, 32), np.float32)])
    with pytest.raises(CalibrationError, match="dtype"):
        collect_statistics(art.path, [np.zeros((2, 32, 32, 3), dtype="U1")])
    with pytest.raises(CalibrationError, match="NaN"):
        collect_statistics(art.path, [np.full((2, 32, 32, 3), np.inf, np.float32)])
    with pytest.raises(ConfigError, match="unknown calibration method"):
        calibrate(collect_statistics(art.path, [np.zeros((2, 32, 32, 3), np.float32)]), "kl")


@pytest.mark.slow
def test_nan_activation_names_the_tensor(tmp_path):
    """An activation that turns to NaN inside the model (log of a negative) is reported by tensor name."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("Log", ["x"], ["log_out"], name="log"),
            helper.make_node("Relu", ["log_out"], ["y"], name="relu"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    with pytest.raises(CalibrationError, match="'log_out'.*NaN"):
        collect_statistics(model, [np.array([[1.0, -1.0, 2.0, 3.0]], np.float32)])


@pytest.mark.slow
def test_cli_calibrate_and_eval_onnx_targets(trained_tiny, synset_dataset, tmp_path, capfd):
    from quantship.cli import main

    _, model_path = trained_tiny
    out = tmp_path / "cal"
    code = main(
        [
            "calibrate",
            "--model",
            str(model_path),
            "--preprocess",
            TINY_PREPROCESS,
            "--data",
            f"imagenet:{synset_dataset}",
            "--calib-images",
            "12",
            "--method",
            "entropy",
            "--cache",
            str(out / "tiny.cache"),
            "--qdq",
            str(out / "tiny-qdq.onnx"),
            "--ranges",
            str(out / "ranges.json"),
            "--out",
            str(out),
        ]
    )
    assert code == 0, capfd.readouterr().err
    cache = read_cache(out / "tiny.cache")
    ranges = json.loads((out / "ranges.json").read_text())
    assert cache.algorithm == "EntropyCalibration2" and "input" in cache.scales
    assert set(cache.scales) == set(ranges["tensors"])
    assert ranges["calibrator"]["method"] == "entropy" and ranges["images"] == 12
    for name, t in ranges["tensors"].items():
        assert cache.scales[name] == pytest.approx(t["calibrated_amax"] / 127, rel=1e-6)
    assert (out / "tiny-qdq.onnx").is_file() and (out / "tiny-qdq.onnx.json").is_file()

    ev = tmp_path / "ev"
    code = main(
        [
            "eval",
            "--model",
            str(model_path),
            "--preprocess",
            TINY_PREPROCESS,
            "--data",
            f"imagenet:{synset_dataset}",
            "--targets",
            "keras-fp32,onnx-fp32,qdq-int8-entropy,qdq-int8-max,tflite-int8,qdq-int8-percentile",
            "--limit",
            "24",
            "--calib-images",
            "12",
            "--calib-percentile",
            "99.5",
            "--out",
            str(ev),
        ]
    )
    assert code == 0, capfd.readouterr().err
    rows = [json.loads(line) for line in (ev / "results.jsonl").read_text().splitlines()]
    assert [r["target"] for r in rows] == [
        "keras-fp32",
        "onnx-fp32",
        "qdq-int8-entropy",
        "qdq-int8-max",
        "tflite-int8",
        "qdq-int8-percentile",
    ]
    assert len({r["eval_data_hash"] for r in rows}) == 1 and all(r["images"] == 24 for r in rows)
    assert rows[1]["agreement_top1"] == 1.0
    assert all(r["agreement_top1"] >= 0.9 for r in rows[2:])
    manifests = {r["target"]: json.loads(Path(r["manifest"]).read_text()) for r in rows if r["manifest"]}
    assert manifests["qdq-int8-percentile"]["calibration_percentile"] == 99.5  # the option is honoured
    assert manifests["qdq-int8-entropy"]["calibration_percentile"] is None


@pytest.mark.slow
def test_qdq_targets_run_the_graph_tensorrt_approximates(onnx_model, sets, tmp_path):
    """The Q/DQ targets stand for TensorRT's int8: ONNX Runtime must run dequantize -> float op, not fuse the
    Q/DQ pairs into its own int8 kernels (whose u8 x s8 path saturates on AVX2 CPUs without VNNI). Checked on
    the graph ORT actually runs, so it fails on any CPU when fusion is on."""
    from quantship.runtime.onnxruntime import SessionDumps, fused_int8_ops, make_session
    from quantship.targets import parse_targets

    _, art = onnx_model
    calib, x, _ = sets
    write_outputs(
        calibrate(collect_statistics(art.path, _batches(calib), scope="qdq"), "max"),
        art.path,
        CalibrationOutputs(qdq=tmp_path / "q.onnx"),
    )
    target = parse_targets("onnx-int8-max")[0]  # the old name is an alias of the canonical one
    assert target.name == "qdq-int8-max"
    make_session(
        tmp_path / "q.onnx",
        1,
        session_config=target.session_config,
        dumps=SessionDumps(optimized_model_path=tmp_path / "ran.onnx"),
    )
    assert fused_int8_ops(tmp_path / "ran.onnx") == []
    make_session(
        tmp_path / "q.onnx", 1, dumps=SessionDumps(optimized_model_path=tmp_path / "default.onnx")
    )  # ORT's default options
    # ORT's default options do fuse (here the pooling; in EfficientNet-Lite0 also two projection Convs): the
    # assertion above is what fails when a Q/DQ target runs with them.
    assert fused_int8_ops(tmp_path / "default.onnx")


def test_a_conv_with_large_activations_equals_numpy_fake_quant():
    """A 1x1 Conv fed by a Q/DQ'd activation of a projection layer's size (|x| up to 40) through the runner:
    every output within one output quantization step of a numpy fake-quant reference."""
    from onnx import TensorProto, helper, numpy_helper

    from quantship.convert.qdq import insert_qdq
    from quantship.runtime.onnxruntime import QDQ_FAKE_QUANT

    rng = np.random.default_rng(3)
    cin, cout = 192, 40
    w = rng.normal(0, 0.2, (cout, cin, 1, 1)).astype(np.float32)
    w[:, :8] *= 6  # a few large weights per channel: the full int8 range is used
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="proj")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, cin, 7, 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, cout, 7, 7])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    x = np.abs(rng.normal(0, 8, (2, cin, 7, 7))).astype(np.float32).clip(0, 40)
    qmodel, _ = insert_qdq(model, {"x": 40.0})
    with OnnxRunner(qmodel.SerializeToString(), num_threads=1, session_config=QDQ_FAKE_QUANT) as r:
        got = r.infer(x)["y"]
    sx = np.float32(40.0 / 127)
    xq = np.clip(np.round(x / sx), -127, 127) * sx
    q, sw = quantize_weight(w, 0)
    wq = q.astype(np.float32) * sw.reshape(-1, 1, 1, 1)
    want = np.einsum("nchw,oc->nohw", xq.astype(np.float64), wq[:, :, 0, 0].astype(np.float64))
    step = np.abs(want).max() / 127
    assert np.abs(got - want).max() <= step
    assert np.abs(got - want).max() < 1e-3 * np.abs(want).max()  # in fact float rounding only
