"""``quantship report``: rebuild report.md and report.html from a results folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from quantship.cli import args as a
from quantship.cli.registry import Command
from quantship.jobs.report import run_report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", help="folder with results.jsonl / signoff.jsonl / bench.jsonl")
    a.common(p)


def run(args: argparse.Namespace) -> int:
    result = run_report(Path(args.results))
    print(result.text)
    return result.exit_code


COMMAND = Command("report", "rebuild report.md and report.html from a results folder", add_arguments, run)
