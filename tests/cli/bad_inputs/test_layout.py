"""The bad-input table stays one table: split by command into this folder, each row's id unique across files."""

from __future__ import annotations

import importlib
from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_the_table_lives_here_only():
    """Rows added to the old single file by a branch that predates the split must move here, not run beside it."""
    old = HERE.parents[1] / "test_bad_inputs.py"
    assert not old.exists(), f"{old} is back: move its rows into {HERE}/test_<command>.py (see table.py)"


def test_row_ids_are_unique_across_commands():
    seen: dict[str, str] = {}
    for path in sorted(HERE.glob("test_*.py")):
        module = importlib.import_module(f"bad_inputs.{path.stem}")
        for case in getattr(module, "CASES", []):
            assert case.id not in seen, f"row id {case.id!r} in both {seen[case.id]} and {path.name}"
            seen[case.id] = path.name
    assert len(seen) >= 150, f"only {len(seen)} rows found"


def test_rows_run_in_process_see_a_heavy_import():
    """The in-process rows stand in for a fresh interpreter only if a heavy import under the guard is refused and
    recorded, also when an earlier row loaded the module (then it comes back afterwards, the same object)."""
    import sys

    from bad_inputs.table import heavy_imports_refused

    importlib.import_module("onnxruntime")
    loaded = sys.modules["onnxruntime"]
    with heavy_imports_refused() as tried:
        try:
            importlib.import_module("onnxruntime.capi")
        except ImportError:
            pass
        else:
            raise AssertionError("the import went through")
    assert tried == ["onnxruntime"]
    assert sys.modules["onnxruntime"] is loaded
