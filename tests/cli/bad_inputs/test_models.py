"""Bad input to ``quantship models``: one row per case (see :mod:`bad_inputs.table`)."""

from __future__ import annotations

import pytest

from bad_inputs.table import Case, params, run_case

CASES = [
    # --- options
    Case(
        "models-live-and-no-stats",
        ("models", "--live-stats", "--no-stats"),
        2,
        "not allowed with argument",
        subprocess=True,
    ),
    Case("models-live-stats-value", ("models", "--live-stats=yes"), 2, "ignored explicit argument 'yes'"),
    Case("models-unknown-option", ("models", "--stats"), 2, "unrecognized arguments: --stats"),
]


@pytest.mark.parametrize("case", params(CASES))
def test_bad_input(case: Case, request, tmp_path, capfd):
    run_case(case, request, tmp_path, capfd)
