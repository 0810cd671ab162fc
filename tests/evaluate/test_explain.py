"""Why a target failed, in one line (from the per-layer diff), and what the demo recommends shipping instead."""

from __future__ import annotations

import numpy as np


def _row(layer, sqnr, before, steps=None, step=None, first=False, layer_type=""):
    return {
        "layer": layer,
        "layer_type": layer_type,
        "sqnr_db": sqnr,
        "input_sqnr_db": before,
        "max_diff_steps": steps,
        "step": step,
        "first_drop": first,
    }


def test_failure_line_names_the_first_drop_and_the_tied_int8_softmax():
    from quantship.evaluate.explain import failure_line

    step = 1 / 256
    rows = [
        _row("conv1", 35.0, "inf", 0.9, 0.02),
        _row("logits", 30.0, 34.0, 1.2, 0.1, layer_type="Dense"),
        _row("probs", 9.0, 30.0, 40.0, step, first=True, layer_type="Softmax"),
    ]
    fp32 = np.array([[0.72, 0.15, 0.13, 0.0]])
    int8 = np.array([[75, 75, 74, 0]]) * step  # the top three within half a step of one int8 value
    int8[0, 1] = int8[0, 0]
    int8[0, 2] = int8[0, 0]
    line = failure_line("tflite-int8", rows, fp32, int8, 0, "chelsea", lambda c: f"class{c}")
    assert line.startswith("tflite-int8 parts from fp32 at probs (Softmax): SQNR 30 -> 9 dB, up to 40.0")
    assert "on chelsea: its top 3 classes fall into one int8 value (0.29, step 0.003906)" in line
    assert "fp32 class0 0.72 leads by" in line
    # No tie but fp32's margin below one step: said so.
    close = np.array([[0.401, 0.399, 0.2, 0.0]])
    line = failure_line("x", rows, close, np.array([[0.39, 0.40, 0.2, 0.0]]), 0, "a", str)
    assert "leads its runner-up by 0.51 quantization steps" in line
    # No drop flagged: the lowest SQNR is named instead.
    line = failure_line("x", [_row("a", 19.0, 40.0), _row("b", 12.0, 19.0)])
    assert line == "x parts from fp32 at b: SQNR 19 -> 12 dB (first below 20 dB: a, 19 dB)"


def test_demo_recommends_per_family_the_first_passing_file_and_names_the_families_without_one():
    from quantship.jobs.demo import family, recommendations

    assert family("tflite-int8+fallback") == "tflite-int8" and family("qdq-int8-mse") == "qdq-int8"
    assert family("tflite-int16x8") == "tflite-int16x8"
    built = ["keras-fp32", "tflite-int8", "qdq-int8-max", "qdq-int8-entropy", "tflite-int8+fallback"]
    preds = [
        {"target": "tflite-int8", "ok": False},
        {"target": "qdq-int8-max", "ok": False},
        {"target": "qdq-int8-entropy", "ok": True},
        {"target": "tflite-int8+fallback", "ok": True},
        {"target": "keras-fp32", "ok": True},
    ]
    ship, missing = recommendations(preds, built)
    assert ship == {"keras-fp32": "keras-fp32", "tflite-int8": "tflite-int8+fallback", "qdq-int8": "qdq-int8-entropy"}
    assert missing == []
    preds[3]["ok"] = False  # the repair fails too: TFLite int8 has nothing to ship
    ship, missing = recommendations(preds, built)
    assert missing == ["tflite-int8"] and "tflite-int8" not in ship


def test_eval_gate_fails_a_target_and_says_why_and_what_passes(trained_tiny, synset_dataset, tmp_path, capsys):
    """`eval --gate`: the int8 file fails a tight distance gate, the line names where it parts from fp32 and the
    fp32 file that passed; the verdicts (with the why) are in verdicts.jsonl and the report."""
    import json

    from conftest import TINY_PREPROCESS
    from quantship.cli import main

    _, model_path = trained_tiny
    out = tmp_path / "out"
    argv = ["eval", "--model", str(model_path), "--preprocess", TINY_PREPROCESS, "--data"]
    argv += [f"imagenet:{synset_dataset}", "--targets", "keras-fp32,tflite-fp32,tflite-int8", "--limit", "12"]
    argv += ["--calib-images", "8", "--threads", "1", "--out", str(out), "--gate", "mean_l1<=0.001"]
    code = main(argv)
    text = capsys.readouterr().out
    assert code == 1, text
    verdicts = [json.loads(line) for line in (out / "verdicts.jsonl").read_text().splitlines()]
    assert [(v["target"], v["verdict"]) for v in verdicts] == [("tflite-fp32", "PASS"), ("tflite-int8", "FAIL")]
    why = verdicts[1]["why"]
    assert why.startswith("tflite-int8 parts from fp32 at ") and "dB" in why, why
    assert why.endswith("passes instead (same run): tflite-fp32"), why
    assert "why" not in verdicts[0]
    assert f"why tflite-int8 failed mean_l1 <= 0.001: {why}" in text
    rows = {r["target"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert rows["tflite-int8"]["gate_verdict"] == "FAIL" and rows["tflite-int8"]["why"] == why
    assert rows["tflite-fp32"]["gate_verdict"] == "PASS"
    assert why in (out / "results.md").read_text()
    assert main(["report", str(out)]) == 0
    assert "Why each failing target failed" in (out / "report.html").read_text()


def test_a_why_line_that_cannot_be_computed_says_so_and_raises_nothing(trained_tiny):
    from conftest import TINY_PREPROCESS
    from quantship.config import parse_preprocess_overrides
    from quantship.errors import DataError
    from quantship.models.loading import resolve_preprocess
    from quantship.targets import get_target
    from quantship.targets.run import load_for
    from quantship.targets.why import why_lines

    _, path = trained_tiny
    loaded = load_for(str(path), None, resolve_preprocess(str(path), None, parse_preprocess_overrides(TINY_PREPROCESS)))
    ref, int8 = get_target("keras-fp32"), get_target("tflite-int8")
    x = np.zeros((2, 32, 32, 3), np.float32)
    lines = why_lines(loaded, ref, [int8], {"keras-fp32": None}, x, "passes instead: y")
    assert lines == {"tflite-int8": "tflite-int8: why not computed: its tensors could not be read (tflite-int8's "
                     "artifact is not on this machine); passes instead: y"}  # fmt: skip

    def unreadable():
        raise DataError("no readable image among the 2 evaluation images")

    lines = why_lines(loaded, ref, [int8], {"keras-fp32": None, "tflite-int8": None}, unreadable)
    assert lines["tflite-int8"].endswith("no images or layers to compare (no readable image among the 2 evaluation "
                                         "images)")  # fmt: skip


def test_demo_names_the_repaired_file_or_one_passing_file_per_family_instead():
    from quantship.jobs.demo import instead_of

    passing = ["keras-fp32", "qdq-int8-entropy", "qdq-int8-max", "ort-int8-entropy", "tflite-int8+fallback"]
    repair = {"target": "tflite-int8+fallback", "repairs": "tflite-int8", "artifact": "a.tflite", "float_units": ["p"]}
    assert instead_of("tflite-int8", passing, [repair]) == "passes instead: tflite-int8+fallback (a.tflite; p in float)"
    assert instead_of("qdq-int8-mse", passing, []) == "passes instead (same run): qdq-int8-entropy"
    assert instead_of("tflite-int16x8", passing, [repair]) == (
        "passes instead (same run): qdq-int8-entropy, ort-int8-entropy, tflite-int8+fallback"
    )
    assert instead_of("tflite-int8", ["keras-fp32"], []) == "nothing else in this run passes"
