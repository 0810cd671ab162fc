"""``quantship diff``: layer-by-layer comparison across Keras, TFLite and ONNX Runtime, and where it names a fault."""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path

import numpy as np
import pytest

# --------------------------------------------------------------------------------------------- metrics (fast)


def test_sqnr_cosine_steps_and_the_first_drop():
    from quantship.evaluate.diff import LayerComparison, first_drop, layer_rows

    rng = np.random.default_rng(0)
    ref = {name: rng.normal(size=(2, 4, 4, 3)).astype(np.float32) for name in ("a", "b", "c", "d")}
    comp = LayerComparison("ref", "tgt")
    comp.update("a", ref["a"], ref["a"], None)  # identical
    comp.update("b", ref["b"], ref["b"] + 0.01 * rng.normal(size=ref["b"].shape), 0.01)  # 40 dB
    comp.update("c", ref["c"], ref["c"] + 0.3 * rng.normal(size=ref["c"].shape), 0.01)  # ~10 dB: a 30 dB drop
    comp.update("d", ref["d"], ref["d"] + 0.3 * rng.normal(size=ref["d"].shape), 0.01)  # no drop against c
    comp.update("e", ref["d"], ref["d"][:1], None)  # shape mismatch: not compared
    order = ["a", "b", "c", "d", "e"]
    rows = layer_rows(comp, order, {"b": ("a",), "c": ("b",), "d": ("c", "b")}, drop_db=10)
    by = {r["layer"]: r for r in rows}
    assert by["a"]["sqnr_db"] == "inf" and by["a"]["cosine"] == pytest.approx(1.0)
    assert by["b"]["sqnr_db"] == pytest.approx(40, abs=1) and by["b"]["max_diff_steps"] == pytest.approx(
        by["b"]["max_abs_diff"] / 0.01
    )
    assert by["c"]["drop_db"] > 20 and first_drop(rows)["layer"] == "c"
    assert not by["d"]["first_drop"] and by["d"]["input_sqnr_db"] == pytest.approx(by["c"]["sqnr_db"])  # worst input
    assert "e" not in by and "e" in comp.shape_mismatch
    json.dumps(rows)  # JSON-safe (no infinities)


def test_a_drop_the_next_layer_undoes_is_not_the_first_drop():
    """A pre-activation that differs only where the ReLU after it clips (a dead channel's bias) drops, but its
    reader is back near its input's SQNR: marked masked, and the first drop is the later one that persists."""
    from quantship.evaluate.diff import LayerComparison, layer_rows

    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
    comp = LayerComparison("ref", "tgt")
    comp.update("conv", x, x + 3 * np.minimum(x, 0), None)  # wrong only below zero: a big drop
    comp.update("relu", np.maximum(x, 0), np.maximum(x, 0) + 1e-3 * rng.normal(size=x.shape), None)
    comp.update("proj", x, x + 0.5 * rng.normal(size=x.shape), None)  # 6 dB: persists into its reader
    comp.update("next", x, x + 0.5 * rng.normal(size=x.shape), None)
    inputs = {"relu": ("conv",), "proj": ("relu",), "next": ("proj",)}
    rows = {r["layer"]: r for r in layer_rows(comp, ["conv", "relu", "proj", "next"], inputs)}
    assert rows["conv"]["masked"] and not rows["conv"]["first_drop"]
    assert rows["proj"]["first_drop"] and not rows["proj"]["masked"]


# ------------------------------------------------------------------------------------------ with a tiny model


def _spec(trained_tiny, synset_dataset, out, targets, **kw):
    from quantship.config import CalibrationSpec
    from quantship.jobs.diff import DiffSpec

    return DiffSpec(
        model=str(trained_tiny[1]),
        data=f"imagenet:{synset_dataset}",
        targets=tuple(targets),
        out_dir=out,
        images=12,
        calibration=CalibrationSpec(num_images=12),
        preprocess_overrides={"mode": "tf", "size": (32, 32), "crop_pct": 1.0},
        threads=1,
        workers=2,
        **kw,
    )


@pytest.mark.slow
def test_diff_names_exactly_the_layer_with_a_wrong_qdq_scale(trained_tiny, synset_dataset, tmp_path):
    """A copy of the Q/DQ model with one Q/DQ pair's scale 10x too small (its tensor clips) against the right one:
    every layer before it is identical, diff marks that layer and no other, whatever the CPU (fake-quant)."""
    import onnx
    from onnx import numpy_helper

    from quantship.config import CalibrationMethod, Precision, TargetSpec
    from quantship.convert.artifact import write_onnx_artifact
    from quantship.convert.layer_names import KerasLayers, onnx_tensor_layers
    from quantship.jobs.diff import run_diff
    from quantship.runtime.onnxruntime import QDQ_FAKE_QUANT
    from quantship.targets import get_target, register_target, unregister_target
    from quantship.targets.onnx import qdq_build

    faulty_layer = "dw1"

    def build(ctx, spec):
        good = qdq_build(ctx, get_target("qdq-int8-max").spec)
        model = onnx.load(str(good.path))
        tensor = onnx_tensor_layers(model, KerasLayers.of(ctx.loaded.model))[faulty_layer].name
        for init in model.graph.initializer:
            if init.name == f"{tensor}_scale":
                init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(0.1), init.name))
                break
        else:
            raise AssertionError(f"no Q/DQ on {tensor}")
        return write_onnx_artifact(model, ctx.artifact_path(spec, ".onnx"), {"target": spec.name})

    register_target(
        TargetSpec("test-qdq-faulty", "onnx", Precision.INT8, calibration=CalibrationMethod.MAX),
        build,
        session_config=QDQ_FAKE_QUANT,
    )
    try:
        result = run_diff(_spec(trained_tiny, synset_dataset, tmp_path, ["qdq-int8-max", "test-qdq-faulty"]))
    finally:
        unregister_target("test-qdq-faulty")
    assert result.exit_code == 0
    summary = next(r for r in result.rows if r["kind"] == "summary")
    assert summary["first_drop_layer"] == faulty_layer
    layers = [r for r in result.rows if r["kind"] == "layer"]
    assert [r["layer"] for r in layers if r["first_drop"]] == [faulty_layer]
    before = layers[: [r["layer"] for r in layers].index(faulty_layer)]
    assert before and all(r["sqnr_db"] == "inf" for r in before)  # identical up to the fault
    assert any("first layer whose SQNR drops" in line and faulty_layer in line for line in result.lines)


@pytest.mark.slow
def test_diff_across_keras_tflite_qdq_and_ort(trained_tiny, synset_dataset, tmp_path):
    """Every target against keras-fp32 in graph order, mapped through Keras layer names, with quantization steps
    for quantized tensors; diff.jsonl, one SQNR chart per target and the report under --out."""
    from quantship.jobs.diff import run_diff

    targets = ["keras-fp32", "tflite-int8", "qdq-int8-entropy", "ort-int8-entropy", "onnx-fp32"]
    result = run_diff(_spec(trained_tiny, synset_dataset, tmp_path, targets))
    assert result.exit_code == 0
    rows = [json.loads(line) for line in (tmp_path / "diff.jsonl").read_text().splitlines()]
    summaries = {r["target"]: r for r in rows if r["kind"] == "summary"}
    assert list(summaries) == targets[1:]
    order = ["input", "conv1", "dw1", "pw1", "gap", "logits", "probs"]
    for name in targets[1:]:
        mine = [r for r in rows if r["kind"] == "layer" and r["target"] == name]
        assert [r["index"] for r in mine] == sorted(r["index"] for r in mine)  # graph order
        assert {r["layer"] for r in mine} <= set(order) and mine[-1]["layer"] == "probs"
        assert (tmp_path / f"diff_sqnr_{name}.png").is_file()
    by = {(r["target"], r["layer"]): r for r in rows if r["kind"] == "layer"}
    assert by[("onnx-fp32", "probs")]["sqnr_db"] == "inf" or by[("onnx-fp32", "probs")]["sqnr_db"] > 80
    assert by[("tflite-int8", "pw1")]["step"] > 0 and by[("tflite-int8", "pw1")]["max_diff_steps"] is not None
    assert by[("qdq-int8-entropy", "dw1")]["step"] > 0  # read after its Q/DQ
    assert by[("ort-int8-entropy", "pw1")]["step"] > 0  # what the fused QLinearConv wrote
    assert 15 < by[("ort-int8-entropy", "probs")]["sqnr_db"] and by[("ort-int8-entropy", "probs")]["cosine"] > 0.99
    assert summaries["qdq-int8-entropy"]["session_config"] == {"session.disable_quant_qdq": "1"}
    assert summaries["ort-int8-entropy"]["session_config"] == {}
    assert any("QLinearConv x3" in n for n in summaries["ort-int8-entropy"]["notes"])
    assert not any("WARNING" in n for s in summaries.values() for n in s["notes"])
    report = (tmp_path / "report.html").read_text()
    assert "quantship diff" in report and "first layer more than 10 dB below its input" in report


@pytest.mark.slow
def test_hidden_flag_runs_the_qdq_targets_at_ort_defaults(trained_tiny, synset_dataset, tmp_path, capsys):
    from quantship.cli import main
    from quantship.jobs.diff import run_diff

    assert main(["diff", "--help"]) == 0
    help_text = capsys.readouterr().out
    assert "--drop-db" in help_text and "--qdq-ort-defaults" not in help_text
    spec = _spec(trained_tiny, synset_dataset, tmp_path, ["keras-fp32", "qdq-int8-max"], qdq_ort_defaults=True)
    summary = next(r for r in run_diff(spec).rows if r["kind"] == "summary")
    assert summary["session_config"] == {}
    assert any("ONNX Runtime int8 kernels: QLinear" in n for n in summary["notes"])  # it fuses (here the pooling)
    assert not any("WARNING" in n for n in summary["notes"])  # and reading the tensors changed none of its fusions


def _cpu_has_vnni() -> bool | None:
    """Whether the CPU has VNNI (AVX512-VNNI or AVX-VNNI); None when the flags cannot be read (not Linux x86)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    if platform.machine().lower() not in ("x86_64", "amd64") or " avx2" not in flags:
        return None
    return "avx512_vnni" in flags or "avx_vnni" in flags


@pytest.mark.slow
@pytest.mark.skipif(_cpu_has_vnni() is not False, reason="needs an x86 CPU with AVX2 and without VNNI (AVX512-VNNI / "
                    "AVX-VNNI): with VNNI, ONNX Runtime's fused u8 x s8 kernels do not saturate")  # fmt: skip
def test_on_a_cpu_without_vnni_diff_points_at_the_block0_projection(tmp_path):
    """The Q/DQ model at ORT's default options (the hidden flag) on AVX2 without VNNI: ORT fuses the block-0
    projection Conv into QLinearConv, whose u8 x s8 kernel saturates 16-bit pair sums: diff names that layer."""
    from quantship.config import CalibrationSpec
    from quantship.jobs.demo import write_demo_data
    from quantship.jobs.diff import DiffSpec, run_diff

    _, calib = write_demo_data(tmp_path / "data")
    spec = DiffSpec(
        model="efficientnet_lite0",
        weights="pretrained",
        data=f"imagenet:{calib}",
        targets=("keras-fp32", "qdq-int8-max"),
        out_dir=tmp_path / "out",
        images=8,
        calibration=CalibrationSpec(num_images=24),
        threads=2,
        qdq_ort_defaults=True,
    )
    summary = next(r for r in run_diff(spec).rows if r["kind"] == "summary")
    assert summary["first_drop_layer"] in ("block0_project_conv", "block0_project_bn"), summary
    assert not math.isnan(float(summary["first_drop_sqnr_db"])) and float(summary["first_drop_sqnr_db"]) < 10


def test_diff_needs_a_reference_and_a_target(tmp_path):
    from quantship.errors import ConfigError
    from quantship.jobs.diff import DiffSpec, run_diff

    with pytest.raises(ConfigError, match="at least one target to compare"):
        run_diff(DiffSpec("efficientnet_lite0", f"imagenet:{tmp_path}", ("keras-fp32",), tmp_path / "o"))
    with pytest.raises(ConfigError, match="keras, tflite and onnx"):
        run_diff(DiffSpec("efficientnet_lite0", f"imagenet:{tmp_path}", ("keras-fp32", "trt-fp16"), tmp_path / "o"))


def test_diff_command_through_main(trained_tiny, synset_dataset, tmp_path):
    """The command itself, through the real parser (its function was tested while its parser lacked
    ``--calib-percentile``, so every run ended in an AttributeError)."""
    from quantship.cli import main

    out = tmp_path / "out"
    argv = ["diff", "--model", str(trained_tiny[1]), "--preprocess", "mode=tf,size=32,crop_pct=1.0"]
    argv += ["--data", f"imagenet:{synset_dataset}", "--images", "4", "--calib-images", "4", "--threads", "1"]
    argv += ["--targets", "keras-fp32,tflite-fp32", "--calib-percentile", "99.9", "--out", str(out), "-q"]
    assert main(argv) == 0
    rows = [json.loads(line) for line in (out / "diff.jsonl").read_text().splitlines()]
    assert [r["target"] for r in rows if r["kind"] == "summary"] == ["tflite-fp32"]
    assert (out / "environment.json").is_file()
