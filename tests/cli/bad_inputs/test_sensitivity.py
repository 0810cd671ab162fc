"""Bad input to ``quantship sensitivity``: one row per case (see :mod:`bad_inputs.table`)."""

from __future__ import annotations

import pytest

from bad_inputs.table import Case, P, params, run_case

CASES = [
    Case(
        "convert-fallback-gate-needs-labels",
        ("convert", "--model", "{model}", "--preprocess", P, "--data", "images:{data}", "--targets", "tflite-int8")
        + ("--auto-fallback", "--gate", "top5>=0.9", "--out", "{out}"),
        2,
        "metric 'top5' needs labels",
        subprocess=True,
    ),
    *(
        Case(
            f"sensitivity-gate-{gate}-on-{kind}",
            ("sensitivity", "--model", "{model}", "--preprocess", P, "--data", f"{kind}:{{data}}")
            + ("--gate", gate, "--out", "{out}"),
            2,
            fragment,
        )
        for gate, kind, fragment in (
            ("top1>=0.99", "images", "--gate top1>=0.99: metric 'top1' needs labels and the evaluation data has none"),
            ("mAP>=0.9", "imagenet", "(mAP is a detection metric)"),
            ("agreement_top1<=0.5", "images", "agreement_top1 must be high, so it takes min"),
            ("mean_l1>=0.9", "images", "mean_l1 is a distance"),
            ("mean_l1<=5", "images", "mean_l1 lies in [0, 2]; got 5"),
            ("agreement_top1>=1.2", "images", "relative must be at most 1 for agreement_top1"),
            ("nonsense>=0.9", "imagenet", "metric 'nonsense' is not measured for a classification model"),
        )
    ),
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
        subprocess=True,
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
