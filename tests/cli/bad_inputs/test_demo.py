"""Bad input to ``quantship demo``: one row per case (see :mod:`bad_inputs.table`)."""

from __future__ import annotations

import pytest

from bad_inputs.table import Case, params, run_case

CASES = [
    Case(
        "demo-adaround-images-0",
        ("demo", "--adaround", "--adaround-images", "0", "--out", "{out}"),
        2,
        "argument --adaround-images: expected a positive integer, got 0",
    ),
    Case(
        "demo-post-training-auto-with-adaround",
        ("demo", "--post-training", "auto", "--adaround", "--out", "{out}"),
        2,
        "--post-training auto chooses the steps itself: drop --adaround",
        subprocess=True,
    ),
]


@pytest.mark.parametrize("case", params(CASES))
def test_bad_input(case: Case, request, tmp_path, capfd):
    run_case(case, request, tmp_path, capfd)
