"""AdaRound: the learned rounding stays on the backends' int8 grid, lowers each layer's output error, and every
exported backend carries exactly its integers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import TINY_PREPROCESS, block_model
from quantship.config import AdaRoundOptions, PtqSteps
from quantship.convert.adaround import AdaRoundStore, channel_scale, nearest_integers
from quantship.convert.ptq import fold_batch_norms, prepare_model


@pytest.fixture(scope="module")
def x24():
    return np.random.default_rng(2).normal(size=(16, 24, 24, 3)).astype(np.float32)


def test_adaround_rounds_up_or_down_on_the_backend_grid_and_lowers_the_error(x24, tmp_path):
    model = block_model()
    folded, _ = fold_batch_norms(model)
    steps = PtqSteps(adaround=AdaRoundOptions(iterations=300, images=16, positions=256))
    store = AdaRoundStore(tmp_path / "a.npz")
    prepared, report = prepare_model(model, steps, lambda: [x24[:8], x24[8:]], store)
    ada = report.adaround
    assert ada.layers == ["stem_conv", "dwconv", "project_conv", "predictions"] and ada.images == 16
    assert 0 < ada.flipped < 0.5
    assert ada.error_adaround < 0.9 * ada.error_nearest  # the point of it
    integers, _ = store.load()
    for name in ada.layers:
        kind = type(folded.get_layer(name)).__name__
        w = np.asarray(folded.get_layer(name).get_weights()[0])
        new = np.asarray(prepared.get_layer(name).get_weights()[0])
        # the grid a backend recomputes from the new weights is the old one, and rounding on it gives q back
        np.testing.assert_allclose(channel_scale(new, kind), channel_scale(w, kind), rtol=1e-6)
        np.testing.assert_array_equal(nearest_integers(new, kind), integers[name])
        assert np.all(np.abs(integers[name] - w / channel_scale(w, kind)) < 1 + 1e-4)  # floor or ceil, nothing else
    assert report.to_dict()["adaround_layers"] == 4 and report.to_dict()["adaround"]["iterations"] == 300

    # stored: a second preparation reads the integers back instead of optimising, with the same report
    again, report2 = prepare_model(model, steps, lambda: [x24[:8], x24[8:]], store)
    assert report2.adaround.cached and report2.to_dict() == report.to_dict()
    for name in ada.layers:
        np.testing.assert_array_equal(again.get_layer(name).get_weights()[0], prepared.get_layer(name).get_weights()[0])


def _layouts(q: np.ndarray, kind: str) -> list[np.ndarray]:
    """The Keras int8 kernel as TFLite and ONNX lay it out."""
    if kind == "Dense":
        return [q, q.T]
    if kind == "DepthwiseConv2D":  # (kh, kw, C, 1)
        return [q.transpose(3, 0, 1, 2), q.transpose(2, 3, 0, 1)]
    return [q.transpose(3, 0, 1, 2), q.transpose(3, 2, 0, 1)]  # TFLite OHWI, ONNX OIHW


def _full_scale_channels(t: np.ndarray, lay: np.ndarray, nudge: int = 0) -> int | None:
    """How many output channels at the full int8 scale (largest |q| = 127) ``t`` has, if each equals ``lay``'s (None
    when ``t`` is not this layer's tensor). ONNX keeps output channels on axis 0 (OIHW, Gemm's B transposed) or on
    the last axis (MatMul's B)."""
    if t.shape != lay.shape:
        return None
    for axis in sorted({0, t.ndim - 1}):
        tc = np.moveaxis(t, axis, 0).reshape(t.shape[axis], -1)
        lc = np.moveaxis(lay, axis, 0).reshape(t.shape[axis], -1)
        full = np.abs(tc.astype(np.int16)).max(axis=1) == 127
        close = np.abs(tc[full].astype(np.int16) - lc[full].astype(np.int16)) <= nudge  # nudge: ort_layout.GRID_NUDGE
        if close.all() and (full.any() or axis == t.ndim - 1):
            return int(full.sum())
    return None


def _tflite_int8_tensors(path) -> list[np.ndarray]:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path), experimental_preserve_all_tensors=True)
    it.allocate_tensors()
    out = []
    for d in it.get_tensor_details():
        if d["dtype"] == np.int8 and len(d["shape"]) >= 2:
            try:
                out.append(np.asarray(it.get_tensor(d["index"])))
            except ValueError:
                pass
    return out


def _onnx_int8_initializers(path) -> list[np.ndarray]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    arrays = [a for a in map(numpy_helper.to_array, model.graph.initializer) if a.ndim >= 2]
    # ONNX Runtime's layout stores convolution and Gemm weights as uint8 q + 128 (calibrate/ort_layout.py)
    return [a for a in arrays if a.dtype == np.int8] + [
        (a.astype(np.int16) - 128).astype(np.int8) for a in arrays if a.dtype == np.uint8
    ]


@pytest.mark.slow
def test_exported_backends_carry_adarounds_integers(trained_tiny, synset_dataset, tmp_path):
    """Through the real command: the int8 weights inside the TFLite file, the Q/DQ model and the ONNX Runtime int8
    model (uint8 q + 128 there) are exactly AdaRound's integers (and differ from round-to-nearest somewhere, so
    this can fail)."""
    from quantship.cli import main

    model, path = trained_tiny
    out = tmp_path / "out"
    targets = "tflite-int8,qdq-int8-max,ort-int8-max"
    argv = ["convert", "--model", str(path), "--preprocess", TINY_PREPROCESS, "--data", f"imagenet:{synset_dataset}"]
    argv += ["--calib-images", "8", "--targets", targets, "--adaround", "--adaround-iterations", "200", "-q"]
    assert main([*argv, "--out", str(out)]) == 0
    (npz,) = (out / "artifacts").glob("*-adaround-*.npz")
    integers, figures = AdaRoundStore(npz).load()
    assert set(integers) == {"conv1", "dw1", "pw1", "logits"} and figures["adaround_images"] == 8
    kinds = {layer.name: type(layer).__name__ for layer in model.layers}
    differs = [
        n for n, q in integers.items() if np.any(q != nearest_integers(model.get_layer(n).get_weights()[0], kinds[n]))
    ]
    assert differs, "AdaRound rounded every weight to nearest: nothing to check"
    files = {
        "tflite-int8": _tflite_int8_tensors(next((out / "artifacts").glob("tiny-tflite-int8+adaround.tflite"))),
        "qdq-int8-max": _onnx_int8_initializers(next((out / "artifacts").glob("tiny-qdq-int8-max+adaround.onnx"))),
        "ort-int8-max": _onnx_int8_initializers(next((out / "artifacts").glob("tiny-ort-int8-max+adaround.onnx"))),
    }
    ort_checked = 0
    for target, tensors in files.items():
        for name, q in integers.items():
            layouts = _layouts(q, kinds[name])
            if target.startswith("ort-"):
                # ONNX Runtime's layout raises a channel's scale where a pair of its weights could saturate MLAS's
                # 16-bit sums (convert/ort_layout.py): such a channel is rounded on ORT's own grid; every channel
                # left at the full int8 scale (its largest |q| is 127) carries AdaRound's integers, but for a pair
                # 1-2 levels over the limit whose smaller weight moved (keep_grid_integers; counted in the manifest)
                counts = [c for t in tensors for lay in layouts if (c := _full_scale_channels(t, lay, 2)) is not None]
                assert counts, f"{target}: {name}'s int8 weights are not AdaRound's"
                ort_checked += max(counts)
                continue
            assert any(t.shape == lay.shape and np.array_equal(t, lay) for t in tensors for lay in layouts), (
                f"{target}: {name}'s int8 weights are not AdaRound's"
            )
        suffix = "tflite" if target.startswith("tflite") else "onnx"
        manifest = json.loads((out / "artifacts" / f"tiny-{target}+adaround.{suffix}.json").read_text())
        assert manifest["post_training"]["adaround"]["iterations"] == 200
        assert manifest["post_training"]["adaround_layers"] == 4
        if target.startswith("ort-"):  # per layer: AdaRound's channels kept, nudged, re-rounded (issue 28)
            layers = manifest["ort_layout"]["layers"]
            assert sum(la["grid_channels"] for la in layers) > 0 and sum(la["grid_kept"] for la in layers) > 0
            assert all(la["grid_kept"] + la["grid_nudged"] + la["grid_lost"] == la["grid_channels"] for la in layers)

    assert ort_checked > 0, "no channel of the ONNX Runtime int8 model is at the full int8 scale"

    # the second run reuses the stored rounding and every artifact
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "artifacts").glob("*+adaround*")}
    assert main([*argv, "--out", str(out)]) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "artifacts").glob("*+adaround*")} == mtimes


def test_weight_study_with_adaround(trained_tiny):
    from conftest import synthetic_set, tf_preprocess
    from quantship.sensitivity import HeldOut, weight_study

    model, _ = trained_tiny
    x, y = synthetic_set(2, seed=22)
    x = tf_preprocess(x)
    held = HeldOut(x, list(y), np.asarray(model(x)))
    steps = PtqSteps(adaround=AdaRoundOptions(iterations=50, images=8))
    rows = weight_study(model, held, ["int8-channel"], ptq=steps, calib_batches=lambda: [x])
    assert [(r["precision"], r["post_training"]) for r in rows] == [
        ("int8-channel", "none"),
        ("int8-channel", "adaround"),
    ]
    assert rows[1]["post_training_report"]["adaround_layers"] == 4


def test_adaround_reads_activations_on_the_int8_grid_a_backend_quantizes():
    """Each layer is fitted on the quantized model's input (AIMET's sampling): the tensors an int8 backend quantizes
    are fake-quantized on an 8-bit grid that holds zero exactly; a convolution output only its ReLU6 reads is not
    (the backend fuses them)."""
    from quantship.convert.adaround import _quantized_output, activation_grid, fake_quant

    folded, _ = fold_batch_norms(block_model())
    quantized = {layer.name for layer in folded.layers if _quantized_output(folded, layer)}
    assert {"stem_relu6", "dw_relu6", "project_conv", "add", "avg_pool", "predictions"} <= quantized
    assert not {"input", "stem_conv", "dwconv"} & quantized
    values = np.random.default_rng(0).normal(1.0, 2.0, 1000).astype(np.float32)
    grid = activation_grid(values)
    fq = fake_quant(values, grid)
    assert len(np.unique(fq)) <= 256 and np.abs(fq - values).max() <= grid[0] / 2 + 1e-6
    assert fake_quant(np.zeros(3, np.float32), grid).tolist() == [0.0, 0.0, 0.0]
