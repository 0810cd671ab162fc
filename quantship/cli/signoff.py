"""``quantship signoff PLAN.yaml``: the models x targets matrix, gates with intervals, the report."""

from __future__ import annotations

import argparse
from pathlib import Path

from quantship.cli import args as a
from quantship.cli.registry import Command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("plan", help="plan file (YAML)")
    p.add_argument("--out", help="results folder (default runs/<plan name>)")
    a.input_cache(p)
    a.common(p)


def run(args: argparse.Namespace) -> int:
    from quantship.jobs.signoff import run_signoff
    from quantship.jobs.specs import SignoffPlan

    plan = SignoffPlan.load(args.plan)
    result = run_signoff(plan, Path(args.out or f"runs/{plan.name}"))
    print(result.text)
    return result.exit_code


COMMAND = Command(
    "signoff",
    "run a sign-off plan (YAML): matrix, gates with intervals, report; exit 1 if a gate fails",
    add_arguments,
    run,
)
