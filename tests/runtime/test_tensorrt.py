"""TensorRT support: every part that needs no TensorRT runs here; the rest runs where TensorRT and a GPU are."""

from __future__ import annotations

import numpy as np
import pytest

from quantship.calibrate.feed import FixedBatches
from quantship.calibrate.trt_cache import CalibrationCache, write_cache
from quantship.config import BatchProfile, Precision, TrtInt8Mode
from quantship.convert.tensorrt import EngineSpec, cache_ranges, plan_build
from quantship.errors import CalibrationError, ConfigError, MissingDependencyError, RuntimeBackendError
from quantship.lazy import is_available
from quantship.runtime.tensorrt import IOTensor, buffer_plan, output_max_shape
from quantship.trt_util import TrtVersion, check_engine_compatible

HAVE_TRT = is_available("tensorrt")
TRT10, TRT11 = TrtVersion.parse("10.13.3.9"), TrtVersion.parse("11.0.0")


def test_version_parsing_and_generation():
    assert TRT10 == TrtVersion(10, 13, 3) and not TRT10.strongly_typed_only
    assert TRT11.strongly_typed_only
    assert TrtVersion.parse("10.0") < TrtVersion.parse("10.1.0") < TRT11
    with pytest.raises(ConfigError):
        TrtVersion.parse("ten")
    with pytest.raises(ConfigError, match="not supported"):
        plan_build(EngineSpec("fp32"), TrtVersion.parse("8.6.1"), False, False)


IMPLICIT, EXPLICIT = TrtInt8Mode.IMPLICIT, TrtInt8Mode.EXPLICIT


@pytest.mark.parametrize(
    "precision,mode,calib,data,cache,expected",
    [
        ("fp32", None, None, False, False, ((), (), "fp32", None)),
        ("fp16", None, None, False, False, ((), ("FP16",), "fp32", None)),
        ("int8", IMPLICIT, "entropy", True, False, ((), ("INT8",), "fp32", "calibrator")),
        ("int8", IMPLICIT, "max", True, True, ((), ("INT8",), "fp32", "calibrator")),
        ("int8", IMPLICIT, "entropy", False, True, ((), ("INT8",), "fp32", "cache-ranges")),
        ("int8", EXPLICIT, None, False, False, ((), ("INT8",), "qdq", None)),
    ],
)
def test_plan_trt10(precision, mode, calib, data, cache, expected):
    plan = plan_build(EngineSpec(precision, int8_mode=mode, calibration=calib), TRT10, data, cache)
    assert (plan.network_flags, plan.builder_flags, plan.onnx_input, plan.int8_source) == expected
    if plan.int8_source == "calibrator":
        assert plan.calibrator == {"entropy": "IInt8EntropyCalibrator2", "max": "IInt8MinMaxCalibrator"}[calib]


@pytest.mark.parametrize(
    "precision,mode,onnx_input", [("fp32", None, "fp32"), ("fp16", None, "fp16"), ("int8", EXPLICIT, "qdq")]
)
def test_plan_trt11_is_strongly_typed(precision, mode, onnx_input):
    plan = plan_build(EngineSpec(precision, int8_mode=mode), TRT11, True, True)
    assert plan.network_flags == ("STRONGLY_TYPED",) and plan.builder_flags == () and plan.onnx_input == onnx_input


def test_trt11_implicit_int8_says_what_to_do():
    with pytest.raises(ConfigError, match="TensorRT 11.*trt-int8-qdq"):
        plan_build(EngineSpec(Precision.INT8, IMPLICIT, "entropy"), TRT11, True, False)


def test_trt10_int8_without_data_or_cache():
    with pytest.raises(ConfigError, match="calibration data or an existing calibration cache"):
        plan_build(EngineSpec(Precision.INT8, IMPLICIT, "entropy"), TRT10, False, False)


def test_option_validation():
    with pytest.raises(ConfigError, match="unknown TensorRT precision"):
        EngineSpec("int4")
    with pytest.raises(ConfigError, match="entropy' or 'max'"):
        EngineSpec("int8", IMPLICIT, calibration="percentile")
    with pytest.raises(ConfigError, match="needs a mode"):
        EngineSpec("int8")
    assert BatchProfile.parse("8") == BatchProfile(8, 8, 8)
    assert BatchProfile.parse("1:4:16") == BatchProfile(1, 4, 16)
    for bad in ("0", "4:2:8", "a:b:c", "1:2"):
        with pytest.raises(ConfigError):
            BatchProfile.parse(bad)


def test_fixed_batches_rechunk_in_order_and_count_the_rest():
    feed = [np.arange(5 * 2, dtype=np.float32).reshape(5, 2) + 100 * k for k in range(3)]
    fb = FixedBatches(feed, 4, [("input", (None, 2))])
    out = list(fb)
    assert [b["input"].shape for b in out] == [(4, 2)] * 3
    np.testing.assert_array_equal(np.concatenate([b["input"] for b in out]), np.concatenate(feed)[:12])
    assert fb.images == 12 and fb.dropped == 3
    with pytest.raises(CalibrationError, match="do not match the model's"):
        list(FixedBatches([{"other": feed[0]}], 2, [("input", (None, 2))]))
    with pytest.raises(CalibrationError, match="NaN"):
        list(FixedBatches([np.full((4, 2), np.nan, np.float32)], 2, [("input", (None, 2))]))


def test_cache_ranges_from_a_quantship_cache(tmp_path):
    cache = CalibrationCache.from_amax({"input": 1.0, "conv1:0": 6.35}, "EntropyCalibration2")
    write_cache(tmp_path / "c.cache", cache)
    from quantship.calibrate.trt_cache import read_cache

    ranges, missing = cache_ranges(["input", "conv1:0", "softmax:0"], read_cache(tmp_path / "c.cache"))
    assert ranges == pytest.approx({"input": 1.0, "conv1:0": 6.35}, rel=1e-6)
    assert missing == ["softmax:0"]


def test_engine_from_another_machine_is_refused_naming_both():
    manifest = {"environment": {"tensorrt": "10.3.0", "gpu": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"}}
    here = {"tensorrt": "10.8.0", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    with pytest.raises(RuntimeBackendError) as exc:
        check_engine_compatible(manifest, here, "m.engine")
    msg = str(exc.value)
    assert "10.3.0" in msg and "10.8.0" in msg and "A100" in msg and "H100" in msg and "8.0" in msg and "9.0" in msg
    check_engine_compatible(manifest, dict(manifest["environment"]))  # same machine: fine


def test_buffer_sizing_from_tensor_metadata():
    inp = IOTensor("input", True, (-1, 224, 224, 3), (32, 224, 224, 3), np.dtype(np.float32))
    out = IOTensor("output", False, (-1, 1000), output_max_shape((-1, 1000), 32), np.dtype(np.float16))
    assert out.max_shape == (32, 1000)
    assert buffer_plan([inp, out]) == {"input": 32 * 224 * 224 * 3 * 4, "output": 32 * 1000 * 2}
    with pytest.raises(RuntimeBackendError, match="data-dependent"):
        buffer_plan([IOTensor("boxes", False, (-1, -1), (-1, -1), np.dtype(np.float32))])


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed here")
def test_missing_tensorrt_is_a_clear_error():
    from quantship.trt_util import import_tensorrt

    with pytest.raises(MissingDependencyError, match="TensorRT is not installed.*pip install"):
        import_tensorrt()


@pytest.mark.slow
def test_fp16_onnx_keeps_float32_io(trained_tiny, tmp_path):
    """TensorRT 11 builds fp16 engines from fp16 ONNX models; I/O stays float32."""
    import onnx

    from quantship.convert.onnx import convert_to_onnx
    from quantship.convert.tensorrt import onnx_fp16

    art = convert_to_onnx(trained_tiny[0], tmp_path / "m.onnx")
    half = onnx.load(str(onnx_fp16(art.path, tmp_path / "m16.onnx")))
    onnx.checker.check_model(half)
    assert half.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert half.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    kinds = {
        i.data_type for i in half.graph.initializer if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    }
    assert kinds == {onnx.TensorProto.FLOAT16}


# ----------------------------------------------------------------- on a machine with TensorRT + GPU


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_TRT, reason="needs TensorRT and an NVIDIA GPU (not installable on CPU machines)")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_matches_onnx_runtime(trained_tiny, tmp_path, precision):
    from quantship.convert.onnx import convert_to_onnx
    from quantship.convert.tensorrt import build_engine
    from quantship.runtime.onnxruntime import OnnxRunner
    from quantship.runtime.tensorrt import TrtRunner

    art = convert_to_onnx(trained_tiny[0], tmp_path / "m.onnx")
    engine = build_engine(
        art.path, EngineSpec(precision, batch=BatchProfile(1, 4, 8)), tmp_path / f"m-{precision}.engine"
    )
    x = np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
    with OnnxRunner(art.path) as ref, TrtRunner(engine.path) as trt:
        expected, got = ref.infer(x)["output"], trt.infer(x)["output"]
        assert set(trt.last_timings) == {"h2d_ms", "compute_ms", "d2h_ms"}
    np.testing.assert_allclose(got, expected, atol=1e-4 if precision == "fp32" else 2e-2)


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_TRT, reason="needs TensorRT and an NVIDIA GPU (not installable on CPU machines)")
@pytest.mark.parametrize("mode,method", [("implicit", "entropy"), ("implicit", "max"), ("explicit", "entropy")])
def test_int8_engines_agree_with_the_fake_quant_model(trained_tiny, tmp_path, mode, method):
    """Implicit int8 (TensorRT 10's calibrators fed by our feed; skipped on TensorRT 11, which has none) and
    explicit int8 from our Q/DQ model: top-1 agrees with the Q/DQ model run as fake-quant on ONNX Runtime, and
    the calibration cache is written, keyed and recorded."""
    from conftest import synthetic_set, tf_preprocess
    from quantship.calibrate.api import calibrate
    from quantship.convert.calibrated import CalibrationOutputs, collect_statistics, write_outputs
    from quantship.convert.onnx import convert_to_onnx
    from quantship.convert.tensorrt import build_engine
    from quantship.runtime.onnxruntime import QDQ_FAKE_QUANT, OnnxRunner
    from quantship.runtime.tensorrt import TrtRunner
    from quantship.trt_util import import_tensorrt

    if mode == "implicit" and TrtVersion.parse(import_tensorrt().__version__).strongly_typed_only:
        pytest.skip("TensorRT 11 has no implicit int8 calibration")
    art = convert_to_onnx(trained_tiny[0], tmp_path / "m.onnx")
    calib = tf_preprocess(synthetic_set(8, seed=5)[0])
    x = tf_preprocess(synthetic_set(10, seed=6)[0])
    batches = [calib[i : i + 8] for i in range(0, len(calib), 8)]
    write_outputs(
        calibrate(collect_statistics(art.path, batches, scope="qdq"), method),
        art.path,
        CalibrationOutputs(qdq=tmp_path / "q.onnx"),
    )
    cache = tmp_path / "m.cache"
    if mode == "implicit":
        spec = EngineSpec("int8", IMPLICIT, method, batch=BatchProfile(1, 8, 8), calibration_cache=cache)
        engine = build_engine(art.path, spec, tmp_path / "m.engine", batches)
        assert cache.is_file() and engine.manifest["build"]["calibration_cache"] == str(cache)
        assert engine.manifest["build"]["calibration_images"] == len(calib)
    else:
        engine = build_engine(
            tmp_path / "q.onnx", EngineSpec("int8", EXPLICIT, batch=BatchProfile(1, 8, 8)), tmp_path / "q.engine"
        )
    with OnnxRunner(tmp_path / "q.onnx", session_config=QDQ_FAKE_QUANT) as ref, TrtRunner(engine.path) as trt:
        expected = np.concatenate([ref.infer(x[i : i + 8])["output"] for i in range(0, len(x), 8)])
        got = np.concatenate([trt.infer(x[i : i + 8])["output"] for i in range(0, len(x), 8)])
    assert np.mean(got.argmax(1) == expected.argmax(1)) >= 0.9
