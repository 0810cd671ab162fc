"""``quantship report``: rebuild the report of a results folder from what it stores (no lock needed)."""

from __future__ import annotations

from pathlib import Path

from quantship.evaluate.report import build_report
from quantship.jobs import JobResult


def run_report(folder: Path, title: str | None = None) -> JobResult:
    md, page = build_report(Path(folder), title)
    return JobResult([], [f"report: {page}, {md}"])
