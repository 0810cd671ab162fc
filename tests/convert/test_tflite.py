"""TFLite conversion at every precision, run through the LiteRT runner, against the Keras reference."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import synthetic_set, tf_preprocess
from quantship.config import IODType, Precision
from quantship.convert.tflite import TfliteConverter, TfliteSpec, convert_to_tflite
from quantship.errors import CalibrationError, ConfigError, RuntimeBackendError
from quantship.runtime.keras import KerasRunner
from quantship.runtime.tflite import TfliteRunner

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data():
    calib_x, _ = synthetic_set(10, seed=11)
    eval_x, eval_y = synthetic_set(20, seed=12)
    return tf_preprocess(calib_x), tf_preprocess(eval_x), eval_y


@pytest.fixture(scope="module")
def converted(trained_tiny, data, tmp_path_factory):
    model, _ = trained_tiny
    calib = data[0]
    out = tmp_path_factory.mktemp("tflite")
    feed = lambda: [calib[i : i + 5] for i in range(0, len(calib), 5)]  # noqa: E731
    arts = {}
    with TfliteConverter(model, out / "convert.log") as conv:
        for p, io in [
            (Precision.FP32, IODType.FLOAT32),
            (Precision.FP16, IODType.FLOAT32),
            (Precision.DYNAMIC, IODType.FLOAT32),
            (Precision.INT8, IODType.INT8),
            (Precision.INT8, IODType.UINT8),
            (Precision.INT8, IODType.FLOAT32),
            (Precision.INT16X8, IODType.FLOAT32),
        ]:
            spec = TfliteSpec(p, io)
            path = out / f"tiny-{p.value}-{io.value}.tflite"
            arts[(p, io)] = convert_to_tflite(
                conv, spec, path, feed if spec.needs_calibration else None, {"source_model": "tiny"}
            )
    return arts


def _run(path, x, threads=1):
    with TfliteRunner(path, num_threads=threads) as r:
        return r.infer(x)


def _keras(model, x):
    with KerasRunner(model) as r:
        return next(iter(r.infer(x).values()))


def test_fp32_matches_keras(trained_tiny, data, converted):
    model, _ = trained_tiny
    x = data[1]
    ref = _keras(model, x)
    got = next(iter(_run(converted[(Precision.FP32, IODType.FLOAT32)].path, x).values()))
    np.testing.assert_allclose(got, ref, atol=1e-4)


def test_tiny_model_learned_the_task(trained_tiny, data):
    model, _ = trained_tiny
    _, x, y = data
    assert (_keras(model, x).argmax(1) == y).mean() >= 0.9


@pytest.mark.parametrize(
    "key",
    [
        (Precision.FP16, IODType.FLOAT32),
        (Precision.DYNAMIC, IODType.FLOAT32),
        (Precision.INT8, IODType.INT8),
        (Precision.INT8, IODType.UINT8),
        (Precision.INT8, IODType.FLOAT32),
        (Precision.INT16X8, IODType.FLOAT32),
    ],
    ids=lambda k: f"{k[0].value}-{k[1].value}" if isinstance(k, tuple) else str(k),
)
def test_quantized_agree_with_fp32_top1(trained_tiny, data, converted, key):
    model, _ = trained_tiny
    x = data[1]
    ref = _keras(model, x).argmax(1)
    out = next(iter(_run(converted[key].path, x).values()))
    assert out.dtype == np.float32  # integer outputs are dequantized by the runner
    assert (out.argmax(1) == ref).mean() >= 0.95


def test_full_integer_model_has_integer_io(converted):
    with TfliteRunner(converted[(Precision.INT8, IODType.UINT8)].path) as r:
        (inp,) = r.input_metadata()
        assert inp.dtype == np.uint8 and inp.quantized
        raw = r.infer(np.zeros((1, 32, 32, 3), np.uint8) + inp.zero_point, raw=True)
        assert next(iter(raw.values())).dtype == np.uint8


def _tensor_dtypes(path):
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path))
    return {np.dtype(d["dtype"]) for d in interp.get_tensor_details()}


def test_precisions_store_the_declared_types(converted):
    """fp16 stores float16 weights, dynamic and int8 int8 weights (an fp32 file would hold neither)."""
    assert np.dtype(np.float16) not in _tensor_dtypes(converted[(Precision.FP32, IODType.FLOAT32)].path)
    assert np.dtype(np.float16) in _tensor_dtypes(converted[(Precision.FP16, IODType.FLOAT32)].path)
    assert np.dtype(np.int16) in _tensor_dtypes(converted[(Precision.INT16X8, IODType.FLOAT32)].path)
    int8 = _tensor_dtypes(converted[(Precision.INT8, IODType.INT8)].path)
    assert np.dtype(np.float32) not in int8  # full integer: no float tensor anywhere


def test_dynamic_range_quantizes_large_weights(tmp_path):
    """The converter leaves tensors under 1024 elements in float; a 64x64 dense layer gets int8 weights."""
    import keras

    inputs = keras.Input((64,))
    model = keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Dense(64, activation="relu")(inputs)))
    with TfliteConverter(model) as conv:
        art = convert_to_tflite(conv, TfliteSpec(Precision.DYNAMIC), tmp_path / "dense.tflite")
    assert np.dtype(np.int8) in _tensor_dtypes(art.path)
    x = np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32)
    ref = model(x).numpy()
    got = next(iter(_run(art.path, x).values()))
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()


def test_manifest_beside_each_artifact(converted):
    for art in converted.values():
        m = json.loads(art.manifest_path.read_text())
        assert m["precision"] == art.manifest["precision"]
        assert m["sha256"] and m["size_bytes"] == art.path.stat().st_size
        assert "tensorflow" in m["tools"]
        assert not list(art.path.parent.glob(".*.tmp*")), "temporary files left behind"


def test_reuse_returns_identical_build(trained_tiny, converted, tmp_path):
    art = converted[(Precision.FP32, IODType.FLOAT32)]
    with TfliteConverter(trained_tiny[0]) as conv:
        again = convert_to_tflite(conv, TfliteSpec(Precision.FP32), art.path, None, {"source_model": "tiny"})
    assert again.manifest["created_utc"] == art.manifest["created_utc"]


def test_calibration_errors(trained_tiny, tmp_path):
    with TfliteConverter(trained_tiny[0]) as conv:
        with pytest.raises(CalibrationError, match="needs a calibration feed"):
            conv.convert(TfliteSpec(Precision.INT8))
        with pytest.raises(CalibrationError, match="NaN"):
            conv.convert(TfliteSpec(Precision.INT8), lambda: [np.full((2, 32, 32, 3), np.nan, np.float32)])
    with pytest.raises(ConfigError):
        TfliteSpec(Precision.FP16, IODType.INT8)


def test_runner_errors(converted, tmp_path):
    path = converted[(Precision.FP32, IODType.FLOAT32)].path
    with TfliteRunner(path) as r:
        with pytest.raises(RuntimeBackendError, match="wrong shape.*got \\(1, 3, 32, 32\\)"):
            r.infer(np.zeros((1, 3, 32, 32), np.float32))
        with pytest.raises(RuntimeBackendError, match="unknown"):
            r.infer({"nope": np.zeros((1, 32, 32, 3), np.float32)})
    corrupt = tmp_path / "corrupt.tflite"
    corrupt.write_bytes(path.read_bytes()[:200])
    with pytest.raises(RuntimeBackendError, match="not a loadable TFLite model"):
        TfliteRunner(corrupt).activate()
    with pytest.raises(RuntimeBackendError, match="not found"):
        TfliteRunner(tmp_path / "absent.tflite").activate()
