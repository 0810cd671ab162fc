"""Bad input to ``quantship report``: one row per case (see :mod:`bad_inputs.table`)."""

from __future__ import annotations

import pytest

from bad_inputs.table import Case, params, results_folder, run_case

CASES = [
    # --- reports of damaged folders
    Case(
        "report-corrupt-environment",
        ("report", "{results}"),
        2,
        "environment.json: the environment record is not valid JSON",
        build=results_folder("{"),
        subprocess=True,
    ),
    Case(
        "report-verdict-row-missing-keys",
        ("report", "{results}"),
        2,
        "verdicts.jsonl:1: verdict row lacks gate, verdict",
        build=results_folder(verdict={"model": "tiny", "target": "tflite-int8", "passed": True}),
    ),
    Case(
        "report-row-without-target",
        ("report", "{results}"),
        2,
        "results.jsonl: row 1 lacks target",
        build=results_folder(drop=("target",)),
    ),
]


@pytest.mark.parametrize("case", params(CASES))
def test_bad_input(case: Case, request, tmp_path, capfd):
    run_case(case, request, tmp_path, capfd)
