"""Bad input to ``quantship calibrate``: one row per case (see :mod:`bad_inputs.table`)."""

from __future__ import annotations

import pytest

from bad_inputs.table import Case, P, garbage_onnx, params, run_case

CASES = [
    Case(
        "calibrate-garbage-onnx",
        ("calibrate", "--model", "{tmp}/garbage.onnx", "--preprocess", P, "--data", "imagenet:{data}")
        + ("--qdq", "{out}/q.onnx", "--out", "{out}"),
        2,
        "garbage.onnx: not a valid ONNX model",
        build=garbage_onnx,
        subprocess=True,
    ),
    Case(
        "calibrate-output-is-a-folder",
        ("calibrate", "--model", "{model}", "--preprocess", P, "--data", "imagenet:{data}")
        + ("--qdq", "{tmp}", "--out", "{out}"),
        2,
        "--qdq {tmp}: is a folder; give a file name",
    ),
]


@pytest.mark.parametrize("case", params(CASES))
def test_bad_input(case: Case, request, tmp_path, capfd):
    run_case(case, request, tmp_path, capfd)
