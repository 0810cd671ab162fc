"""``quantship signoff PLAN.yaml``: the models x targets matrix, gates with intervals, the report."""

from __future__ import annotations

import argparse
from pathlib import Path

from quantship.cli import args as a
from quantship.cli.registry import Command
from quantship.fileio import check_output_dir, sweep_temp_files
from quantship.jobs.signoff import SignoffPlan, run_signoff


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("plan", help="plan file (YAML)")
    p.add_argument("--out", help="results folder (default runs/<plan name>); with Ray, a path every node sees")
    p.add_argument(
        "--ray-address",
        metavar="ADDR",
        type=a.text_value("the Ray head's HOST:PORT"),
        help="run the units on the Ray cluster whose head is at HOST:PORT (needs quantship[ray]); the plan's "
        "'executor: ray' without an address starts a local instance (loopback only); RAY_ADDRESS is not read",
    )
    a.input_cache(p)
    p.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="NaN or inf outputs (counted in the rows) do not fail the run (plan key allow_nonfinite)",
    )
    p.add_argument(
        "--allow-missing-images",
        action="store_true",
        help="evaluate the images present when the ground truth lists absent files (plan key allow_missing_images)",
    )
    p.add_argument(
        "--trust-savedmodel",
        action="store_true",
        help="allow SavedModel folders, which run their graph's operations (plan key trust_savedmodel)",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="an underpowered PASS (the point value clears a gate, its interval does not) fails the run "
        "(plan key strict; gates with decision: interval are INCONCLUSIVE instead)",
    )
    a.common(p)


def run(args: argparse.Namespace) -> int:
    flags = ("allow_nonfinite", "allow_missing_images", "trust_savedmodel", "strict")
    plan = SignoffPlan.load(args.plan, {f: True for f in flags if getattr(args, f)})
    out = Path(args.out or f"runs/{plan.name}")
    a.check_out_outside_data(str(out), {"the plan's dataset": plan.data, "calibration.data": plan.calibration.data})
    if not args.out:  # an explicit --out is checked before the command runs
        check_output_dir(out)
        sweep_temp_files(out)
    result = run_signoff(plan, out, ray_address=args.ray_address)
    print(result.text)
    return result.exit_code


COMMAND = Command(
    "signoff",
    "run a sign-off plan (YAML): matrix, gates with intervals, report; exit 1 if a gate fails",
    add_arguments,
    run,
)
