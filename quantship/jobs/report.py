"""``quantship report``: rebuild the report of a results folder from what it stores (no lock needed)."""

from __future__ import annotations

from pathlib import Path

from quantship.errors import DataError
from quantship.evaluate.report import build_report
from quantship.fileio import check_output_dir, sweep_temp_files
from quantship.jobs import JobResult


def run_report(folder: Path, title: str | None = None) -> JobResult:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"results folder not found: {folder}")
    check_output_dir(folder, "results folder")  # the report is written into it
    sweep_temp_files(folder)
    md, page = build_report(folder, title)
    return JobResult([], [f"report: {page}, {md}"])
