"""Bad input to ``quantship diff``: one row per case (see :mod:`bad_inputs.table`)."""

from __future__ import annotations

import pytest

from bad_inputs.table import Case, P, params, run_case

CASES = [
    Case(
        "diff-ort-providers-unavailable",
        ("diff", "--model", "{model}", "--preprocess", P, "--data", "imagenet:{data}", "--images", "2")
        + ("--calib-images", "2", "--targets", "keras-fp32,onnx-fp32", "--ort-providers", "cuda", "--out", "{out}"),
        2,
        "--ort-providers: CUDAExecutionProvider not available",
        heavy=True,
    ),
]


@pytest.mark.parametrize("case", params(CASES))
def test_bad_input(case: Case, request, tmp_path, capfd):
    run_case(case, request, tmp_path, capfd)
