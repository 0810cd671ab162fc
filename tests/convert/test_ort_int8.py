"""The ONNX Runtime int8 layout (``ort-int8-<method>``) and the residual-Add rule of the TensorRT Q/DQ placement."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import synthetic_set, tf_preprocess

# ------------------------------------------------------------------------------- placement (no model needed)


def _residual_graph():
    """x -> conv_a -> r (ReLU) -> conv_b -> conv_c -> add(conv_c, r)  and  add2(conv_d(r2), conv_e(r2)) where both
    Add inputs come from convolutions: the skip input of add is a ReLU, of add2 the shallower conv."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def w(name):
        return numpy_helper.from_array(rng.normal(0, 0.3, (4, 4, 1, 1)).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["a"], name="conv_a"),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "wb"], ["b"], name="conv_b"),
        helper.make_node("Conv", ["b", "wc"], ["c"], name="conv_c"),
        helper.make_node("Add", ["c", "r"], ["s1"], name="add"),  # branch c (fusable), skip r
        helper.make_node("Conv", ["s1", "wd"], ["d"], name="conv_d"),  # d feeds add2 and conv_e: not fusable
        helper.make_node("Conv", ["d", "we"], ["e"], name="conv_e"),
        helper.make_node("Add", ["d", "e"], ["s2"], name="add2"),  # branch e (fusable, deeper), skip d (a conv)
        helper.make_node("Add", ["s2", "s1"], ["y"], name="add3"),  # no weighted input: both quantized
    ]
    graph = helper.make_graph(
        nodes,
        "residual",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        [w("wa"), w("wb"), w("wc"), w("wd"), w("we")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def test_residual_add_quantizes_the_skip_input_even_from_a_conv():
    from quantship.convert.qdq import activation_inputs, qdq_tensors

    model = _residual_graph()
    by_name = {model.graph.node[k].name: v for k, v in activation_inputs(model).items()}
    assert by_name["add"] == [1]  # r (the skip), not c (the branch conv TensorRT fuses with the Add)
    assert by_name["add2"] == [0]  # d, although a conv produced it: it also feeds conv_e, so it is the skip
    assert by_name["add3"] == [0, 1]  # no input from a weighted op
    assert "e" not in qdq_tensors(model) and "c" not in qdq_tensors(model)


@pytest.mark.slow
def test_every_residual_add_of_efficientnet_lite0_gets_its_skip_input_quantized(tmp_path):
    import onnx

    from quantship.convert.onnx import convert_to_onnx
    from quantship.convert.qdq import activation_inputs
    from quantship.models.loading import load_model

    art = convert_to_onnx(load_model("efficientnet_lite0", "random").model, tmp_path / "lite0.onnx")
    model = onnx.load(str(art.path))
    producers = {o: n for n in model.graph.node for o in n.output}
    uses = [i for n in model.graph.node for i in n.input]
    adds = {k: v for k, v in activation_inputs(model).items() if model.graph.node[k].op_type == "Add"}
    assert len(adds) == 9
    for k, idx in adds.items():
        node = model.graph.node[k]
        assert len(idx) == 1, node.name  # one input quantized: the skip; the branch's project conv stays float
        branch, skip = node.input[1 - idx[0]], node.input[idx[0]]
        assert producers[branch].op_type == "Conv" and uses.count(branch) == 1, node.name  # the block's project conv
        assert uses.count(skip) == 2, node.name  # the previous block's output, also read by this block's expand conv


# ------------------------------------------------------------------------------------- the ORT int8 layout


@pytest.fixture(scope="module")
def tiny_onnx(trained_tiny, tmp_path_factory):
    from quantship.convert.onnx import OnnxSpec, convert_to_onnx

    model, _ = trained_tiny
    art = convert_to_onnx(model, tmp_path_factory.mktemp("ort") / "tiny.onnx", OnnxSpec(opset=17))
    calib, _ = synthetic_set(12, seed=31)
    evalx, _ = synthetic_set(40, seed=32)
    return model, art, tf_preprocess(calib), tf_preprocess(evalx)


def _ort_model(art, calib, method, tmp_path):
    from quantship.calibrate.api import calibrate
    from quantship.convert.calibrated import collect_statistics, write_ort_model

    collector = collect_statistics(art.path, [calib[i : i + 6] for i in range(0, len(calib), 6)], scope="qdq")
    path = tmp_path / f"ort-{method}.onnx"
    report = write_ort_model(calibrate(collector, method), art.path, path, {"target": f"ort-int8-{method}"})
    return path, report


def _run(path, x, session_config=(), optimized=None):
    from quantship.runtime.onnxruntime import SessionDumps, make_session

    s = make_session(path, 1, session_config=session_config, dumps=SessionDumps(optimized_model_path=optimized))
    return s.run(None, {"input": x})[0]


@pytest.mark.slow
def test_ort_int8_runs_fused_int8_kernels_and_equals_its_fake_quant(tiny_onnx, tmp_path):
    """The artifact's weights are int8 with zero point 0 (u8 x s8 kernels); ORT at its default options fuses every
    Conv into QLinearConv; the fused outputs equal the same file run as fake-quant within rounding (on this CPU
    too, whether it has VNNI or not: no kernel pair can saturate)."""
    import json

    import onnx
    from onnx import numpy_helper

    from quantship.convert.ort_layout import artifact_weight_types
    from quantship.runtime.onnxruntime import QDQ_FAKE_QUANT, fused_int8_ops
    from quantship.targets import parse_targets

    _, art, calib, x = tiny_onnx
    path, report = _ort_model(art, calib, "max", tmp_path)
    assert not report.missing_ranges and not report.bias_clipped
    model = onnx.load(str(path))
    assert artifact_weight_types(model) == {"Conv": ["int8"], "Gemm": ["int8"]}
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    consumers = {i: n for n in model.graph.node for i in n.input}
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and n.input[0].endswith("_wq"):
            conv = consumers[n.output[0]]
            assert conv.op_type in ("Conv", "Gemm")
            assert inits[n.input[0]].dtype == np.int8 and not inits[n.input[2]].any()
    manifest = json.loads(path.with_name(path.name + ".json").read_text())
    assert manifest["ort_layout"]["session_options_needed"] == {}
    assert manifest["ort_layout"]["weights"]["conv"] == "int8_pairs"
    assert manifest["ort_layout"]["exact_on_x86_without_vnni"] is True
    layers = {la["kind"]: la for la in manifest["ort_layout"]["layers"]}
    assert set(layers) == {"conv", "depthwise", "gemm"} and all(la["why"] for la in layers.values())
    assert parse_targets("ort-int8-max")[0].session_config == ()  # the target runs at ORT's defaults

    fused = _run(path, x, optimized=tmp_path / "ran.onnx")
    ops = [op.split(":")[0] for op in fused_int8_ops(tmp_path / "ran.onnx")]
    assert ops.count("QLinearConv") == 3 and "QGemm" in ops
    ran = onnx.load(str(tmp_path / "ran.onnx")).graph
    assert not [n for n in ran.node if n.op_type in ("Conv", "FusedConv", "Relu", "Clip")]  # nothing left float
    fake = _run(path, x, QDQ_FAKE_QUANT, optimized=tmp_path / "fake.onnx")
    assert fused_int8_ops(tmp_path / "fake.onnx") == []
    # Requantisation in the integer kernels rounds in fixed point where fake-quant rounds a float: ties may land on
    # the other side, so the probabilities agree to a few quantization steps, and every top-1 is the same.
    assert np.abs(fused - fake).max() < 0.02
    assert (fused.argmax(1) == fake.argmax(1)).all()
    # The first QLinearConv (conv1 + ReLU, fed the same uint8 input either way) is within one step of fake-quant.
    from quantship.convert.layer_names import KerasLayers, onnx_tensor_layers
    from quantship.runtime.onnxruntime import make_session, tap_tensors

    tensor = onnx_tensor_layers(model, KerasLayers.of(tiny_onnx[0]))["conv1"].name
    tapped = tap_tensors(model, [tensor])
    got = [
        make_session(tapped.model, 1, session_config=config).run([tapped.outputs[tensor]], {"input": x})[0]
        for config in ((), QDQ_FAKE_QUANT)
    ]
    assert tapped.steps[tensor] > 0 and np.abs(got[0] - got[1]).max() <= tapped.steps[tensor] * 1.001


@pytest.mark.slow
@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_ort_int8_accuracy_is_that_of_its_fake_quant(tiny_onnx, method, tmp_path):
    from quantship.runtime.onnxruntime import QDQ_FAKE_QUANT

    model, art, calib, x = tiny_onnx
    path, _ = _ort_model(art, calib, method, tmp_path)
    ref = _run(art.path, x).argmax(1)
    fused, fake = _run(path, x).argmax(1), _run(path, x, QDQ_FAKE_QUANT).argmax(1)
    assert (fake == ref).mean() >= 0.9
    assert abs((fused == ref).mean() - (fake == ref).mean()) <= 1 / len(x) + 1e-9


def test_uint8_params_let_ort_remove_a_relu6():
    """After a ReLU6 the zero point is 0 and float32(scale) * 255 <= 6 + FLT_EPSILON, ORT's test for removing it."""
    from quantship.convert.ort_layout import uint8_params

    for hi in (6.0, 5.99999, 6.0000005):
        scale, zp = uint8_params(0.0, min(hi, 6.0), clip_hi=6.0)
        assert zp == 0 and np.float32(scale * np.float32(255)) <= np.float32(6) + np.finfo(np.float32).eps
    scale, zp = uint8_params(-1.0, 3.0)
    assert zp == 64 and scale == pytest.approx(4 / 255)


def test_weights_are_uint8_with_zero_point_128_and_int32_bias_never_overflows():
    from quantship.convert.ort_layout import WeightType, quantize_weight

    w = np.array([[[[0.5]], [[-1.0]]], [[[0.0]], [[0.0]]], [[[2.54]], [[1.27]]]], np.float32)  # (3, 2, 1, 1)
    q, scale, zp = quantize_weight(w, 0, WeightType.UINT8)
    assert q.dtype == np.uint8 and (zp == 128).all()
    np.testing.assert_array_equal(q[:, :, 0, 0].astype(int) - 128, [[64, -127], [0, 0], [127, 64]])
    q8, _, zp8 = quantize_weight(w, 0, WeightType.INT8)
    assert q8.dtype == np.int8 and not zp8.any()
    # A dead channel (weights 1e-9, bias 1.2) with s_x = 0.02: the scale floor keeps bias / (s_x * s_w) < 2**31.
    floor = np.array([1.2 / (0.02 * 2.0**30)] * 3)
    _, s, _ = quantize_weight(np.full((3, 2, 1, 1), 1e-9, np.float32), 0, WeightType.UINT8, floor)
    assert (1.2 / (0.02 * s) < 2**31).all()


def test_bench_times_a_target_with_its_session_options(tmp_path):
    """``bench`` runs each configuration in a worker process from JSON: the target's session options survive it."""
    import json
    from dataclasses import asdict

    from quantship.evaluate.bench import BenchConfig
    from quantship.runtime.onnxruntime import QDQ_FAKE_QUANT

    cfg = BenchConfig(str(tmp_path / "m.onnx"), target="qdq-int8-max", session_config=QDQ_FAKE_QUANT)
    assert BenchConfig(**json.loads(json.dumps(asdict(cfg)))).session_config == QDQ_FAKE_QUANT


def _im2col(x: np.ndarray, node, w_shape, zero_point: int) -> np.ndarray:
    """uint8 NCHW input -> (output pixels, K) patches of one group in MLAS's K order (kernel position major, input
    channel minor), padded with the input's zero point as QLinearConv pads."""
    attrs = {a.name: list(a.ints) for a in node.attribute if a.ints}
    kh, kw = w_shape[2:]
    sh, sw = attrs.get("strides", [1, 1])
    pt, pl, pb, pr = attrs.get("pads", [0, 0, 0, 0])
    xp = np.pad(x[0], ((0, 0), (pt, pb), (pl, pr)), constant_values=zero_point)
    oh, ow = (xp.shape[1] - kh) // sh + 1, (xp.shape[2] - kw) // sw + 1
    cols = [xp[:, i : i + sh * oh : sh, j : j + sw * ow : sw] for i in range(kh) for j in range(kw)]  # (C, oh, ow)
    return np.stack(cols, 0).transpose(2, 3, 0, 1).reshape(oh * ow, kh * kw * x.shape[1])


@pytest.mark.slow
def test_no_u8s8_kernel_pair_saturates_without_vnni(tiny_onnx, tmp_path):
    """Exact emulation of MLAS's u8 x s8 kernels on x86 without VNNI (pairs of products added with 16-bit
    saturation) on every non-depthwise layer of the ``ort-int8-max`` file, fed its real uint8 activations: equal to
    the exact int32 sums. Full int8 weights of the same layers do saturate on the worst input (255 where a weight
    is positive) - the pair check is what prevents it - and the int8_pairs weights do not, even there."""
    import onnx
    from onnx import numpy_helper

    from quantship.convert.ort_layout import (
        PAIR_LIMIT,
        WeightType,
        kernel_order,
        mlas_u8s8_accumulate,
        quantize_weight,
    )
    from quantship.runtime.onnxruntime import QDQ_FAKE_QUANT, make_session

    _, art, calib, x = tiny_onnx
    path, report = _ort_model(art, calib, "max", tmp_path)
    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    layers = []
    for n in model.graph.node:
        if n.op_type not in ("Conv", "Gemm"):
            continue
        wdq, xdq = producer[n.input[1]], producer[n.input[0]]
        q = inits[wdq.input[0]]
        if n.op_type == "Conv" and q.shape[1] == 1 and q.shape[0] > 1:
            continue  # depthwise: no pair sums in 16 bits
        layers.append((n, q, xdq.input[0], int(inits[xdq.input[2]])))
    assert {n.op_type for n, *_ in layers} == {"Conv", "Gemm"}
    tapped = onnx.ModelProto()
    tapped.CopyFrom(model)
    for _, _, t, _ in layers:
        tapped.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
    names = [t for _, _, t, _ in layers]
    acts = make_session(tapped, 1, session_config=QDQ_FAKE_QUANT).run(names, {"input": x[:4]})
    limited_somewhere, saturated_full = 0, 0
    for (n, q, _, zp), a in zip(layers, acts):
        assert a.dtype == np.uint8
        rows = kernel_order(n, q)  # (Cout, K)
        a2 = np.concatenate([_im2col(a[i : i + 1], n, q.shape, zp) for i in range(len(a))]) if q.ndim == 4 else a
        exact = a2.astype(np.int32) @ rows.T.astype(np.int32)
        np.testing.assert_array_equal(mlas_u8s8_accumulate(a2, rows.T), exact, err_msg=n.name)
        worst = (255 * (rows > 0)).astype(np.uint8)  # per channel: every positive weight times 255
        np.testing.assert_array_equal(
            np.diag(mlas_u8s8_accumulate(worst, rows.T)), np.diag(worst.astype(np.int32) @ rows.T.astype(np.int32))
        )
        # The same layer at the full int8 scale (weights dequantized from the file: equal within rounding)
        axis = 0
        if n.op_type == "Gemm" and not next((a.i for a in n.attribute if a.name == "transB"), 0):
            axis = 1
        shape = [1] * q.ndim
        shape[axis] = -1
        wf = q.astype(np.float32) * inits[producer[n.input[1]].input[1]].reshape(shape)
        full, _, _ = quantize_weight(wf, axis, WeightType.INT8)
        full_rows = kernel_order(n, full)
        worst = (255 * (full_rows > 0)).astype(np.uint8)
        sat = np.diag(mlas_u8s8_accumulate(worst, full_rows.T))
        saturated_full += int((sat != np.diag(worst.astype(np.int32) @ full_rows.T.astype(np.int32))).sum())
    for la in report.layers:
        limited_somewhere += la.limited
        if la.weight_type == "int8_pairs":
            assert (la.limited > 0) == (la.worst_pair > PAIR_LIMIT), la
            assert la.min_levels >= 64 and (la.min_levels < 127) == (la.limited > 0), la
    assert limited_somewhere > 0 and saturated_full > 0


def test_pair_safe_scales_only_raise_the_channels_that_could_saturate():
    """Channel 0 has a same-sign kernel pair (127 + 127 levels): its scale rises until the pair fits 128 levels;
    channel 1's largest pair is mixed-sign and channel 2's same-sign pair is 127 + 1: both keep amax / 127."""
    from quantship.convert.ort_layout import PAIR_LIMIT, WeightType, pair_sums, quantize_weight

    w = np.zeros((3, 4, 1, 1), np.float32)
    w[0, :, 0, 0] = [1.0, 1.0, 0.0, 0.5]
    w[1, :, 0, 0] = [1.0, -1.0, 0.3, -0.3]
    w[2, :, 0, 0] = [1.0, 1 / 127, -0.5, 0.0]
    q, scale, zp = quantize_weight(w, 0, WeightType.INT8_PAIRS, kernel_rows=w.reshape(3, 4))
    assert q.dtype == np.int8 and not zp.any()
    np.testing.assert_allclose(scale[1:], [1 / 127, 1 / 127], rtol=1e-6)
    assert scale[0] > 1 / 127 and scale[0] <= 2 / 127.0 + 1e-7  # at most 7 bits on that channel
    assert pair_sums(q.reshape(3, 4)).max() <= PAIR_LIMIT and pair_sums(q.reshape(3, 4))[0] >= PAIR_LIMIT - 1
    full, _, _ = quantize_weight(w, 0, WeightType.INT8)
    assert pair_sums(full.reshape(3, 4))[0] == 254  # what the pair check is for


def test_adarounds_integers_are_kept_at_the_full_scale_where_a_pair_is_at_most_two_levels_over():
    """Weights on their int8 grid (AdaRound's s * q): channel 0 is under the pair limit and keeps its integers;
    channel 1's pair is 2 levels over: its smaller weight moves 2 levels, every other integer and the scale stay;
    channel 2's pair is 20 over: its scale rises (re-rounded, counted lost). Through the layout's own writer, on a
    3x3 Conv whose pairs MLAS forms in (kernel position, input channel) order; the file's kernel never saturates."""
    from onnx import helper, numpy_helper

    from quantship.convert.ort_layout import (
        PAIR_LIMIT,
        OrtQdqReport,
        OrtWeights,
        WeightType,
        _OrtQdqWriter,
        kernel_order,
        kernel_unorder,
        pair_sums,
        quantize_weight,
    )

    rng = np.random.default_rng(0)
    q = rng.integers(-40, 40, size=(3, 2, 3, 3))
    q[:, 0, 0, 0] = 127  # every channel's largest weight (scale amax / 127), first of the pair (ic 0, ic 1) at (0, 0)
    q[:, 1, 0, 0] = [-50, 3, 21]  # pair sums: mixed sign; 130 (2 over); 148 (20 over)
    q[:, :, 2, 2] = 0
    scale = np.array([0.01, 0.02, 0.005], np.float32)
    w = (q * scale[:, None, None, None]).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", kernel_shape=[3, 3])
    np.testing.assert_array_equal(kernel_unorder(node, kernel_order(node, w), w), w)
    report = OrtQdqReport()
    writer = _OrtQdqWriter({}, {"w": numpy_helper.from_array(w, "w")}, OrtWeights(), report)
    writer.weight_dq(node, "w", 0.0)
    got = {i.name: numpy_helper.to_array(i) for i in writer.new_inits}
    qf, sf = got["conv_w_wq"].astype(np.int32), got["conv_w_wscale"]
    np.testing.assert_allclose(sf[:2], scale[:2], rtol=1e-6)
    assert sf[2] > scale[2]  # 20 levels over: the scale rises
    np.testing.assert_array_equal(qf[0], q[0])  # kept exactly
    moved = np.argwhere(qf[1] != q[1])
    assert moved.tolist() == [[1, 0, 0]] and qf[1, 1, 0, 0] == 1  # only the pair's smaller weight, by 2 levels
    assert pair_sums(kernel_order(node, qf)).max() <= PAIR_LIMIT
    (layer,) = report.layers
    assert (layer.grid_channels, layer.grid_kept, layer.grid_nudged, layer.grid_lost) == (3, 1, 1, 1)
    assert layer.grid_weights_moved == 1 and layer.limited == 1 and "AdaRound" in layer.why
    # weights that are not on a grid (a float model) are untouched by this: the pair-safe scale as before
    w2 = w + rng.normal(0, 1e-3, w.shape).astype(np.float32)
    report2 = OrtQdqReport()
    _OrtQdqWriter({}, {"w": numpy_helper.from_array(w2, "w")}, OrtWeights(), report2).weight_dq(node, "w", 0.0)
    assert report2.layers[0].grid_channels == 0
    # a depthwise layer (full int8) keeps every channel on its grid, and records them
    dw = helper.make_node("Conv", ["x", "d"], ["z"], name="dw", kernel_shape=[3, 3], group=3)
    d = (q[:, :1] * scale[:, None, None, None]).astype(np.float32)
    report3 = OrtQdqReport()
    _OrtQdqWriter({}, {"d": numpy_helper.from_array(d, "d")}, OrtWeights(), report3).weight_dq(dw, "d", 0.0)
    assert (report3.layers[0].kind, report3.layers[0].grid_channels, report3.layers[0].grid_kept) == ("depthwise", 3, 3)
    _, s2, _ = quantize_weight(w2, 0, WeightType.INT8_PAIRS, kernel_rows=kernel_order(node, w2))
    assert (s2 > np.abs(w2).reshape(3, -1).max(1) / 127 * (1 + 1e-6)).sum() == 2  # both pairs over: raised


def test_a_zero_pad_before_a_conv_is_folded_into_its_pads_with_the_same_outputs(tmp_path):
    """MobileNetV2's stride-2 depthwise inputs: Pad(0) -> Conv. Left in the Q/DQ model it runs in float between a
    DQ and a Q (a fifth of the int8 time); folded into the Conv's pads it is gone, and the outputs are the same."""
    import onnx
    from onnx import helper, numpy_helper

    from quantship.convert.ort_layout import fold_pad
    from quantship.runtime.onnxruntime import make_session

    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 1, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Pad", ["x", "pads"], ["p"], name="pad"),
        helper.make_node("Conv", ["p", "w"], ["y"], name="dw", group=4, strides=[2, 2], pads=[0, 0, 1, 1]),
    ]
    inits = [numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads")]
    inits.append(numpy_helper.from_array(w, "w"))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 9, 9])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    folded, n = fold_pad(model)
    assert n == 1 and [x.op_type for x in folded.graph.node] == ["Conv"]
    assert list(next(a.ints for a in folded.graph.node[0].attribute if a.name == "pads")) == [1, 1, 2, 2]
    x = rng.normal(size=(1, 4, 9, 9)).astype(np.float32)
    outs = []
    for i, mdl in enumerate((model, folded)):
        path = tmp_path / f"m{i}.onnx"
        onnx.save(mdl, path)
        outs.append(make_session(path, 1).run(None, {"x": x})[0])
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    # a reflect pad, or one that pads channels, stays
    model.graph.node[0].attribute.extend([helper.make_attribute("mode", "reflect")])
    assert fold_pad(model)[1] == 0
