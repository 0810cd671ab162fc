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
