"""Bad input to ``quantship sensitivity``: one row per case (see :mod:`bad_inputs.table`)."""

from __future__ import annotations

import pytest

from bad_inputs.table import Case, P, params, run_case

CASES = [
    Case(
        "sensitivity-adaround-iterations-without-adaround",
        (
            "sensitivity",
            "--model",
            "{model}",
            "--data",
            "imagenet:{data}",
            "--adaround-iterations",
            "9",
            "--out",
            "{out}",
        ),
        2,
        "--adaround-iterations set AdaRound's budget: add --adaround",
    ),
    Case(
        "sensitivity-has-no-post-training-auto",
        ("sensitivity", "--model", "{model}", "--data", "imagenet:{data}", "--post-training", "auto", "--out", "{out}"),
        2,
        "unrecognized arguments: --post-training auto",
    ),
    Case(
        "sensitivity-recipe-without-equals",
        ("sensitivity", "--model", "{model}", "--preprocess", P, "--data", "imagenet:{data}")
        + ("--recipe", "conv1", "--out", "{out}"),
        2,
        "--recipe expects layer=kind pairs separated by commas, got 'conv1'",
    ),
]


@pytest.mark.parametrize("case", params(CASES))
def test_bad_input(case: Case, request, tmp_path, capfd):
    run_case(case, request, tmp_path, capfd)
