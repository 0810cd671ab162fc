"""``quantship signoff PLAN.yaml``: run the plan (:mod:`quantship.signoff`), build the report, decide the exit code."""

from __future__ import annotations

from pathlib import Path

from quantship.evaluate.report import VERDICT_COLUMNS, build_report, load_results
from quantship.evaluate.results import text_table
from quantship.evaluate.verdicts import overall_verdict
from quantship.jobs import JobResult
from quantship.progress import note
from quantship.signoff.plan import SignoffPlan
from quantship.signoff.run import make_executor, signoff
from quantship.targets.run import nonfinite_error

__all__ = ["SignoffPlan", "run_signoff"]


def run_signoff(plan: SignoffPlan, out_dir: Path, ray_address: str | None = None) -> JobResult:
    """``quantship signoff``: run or resume, build the report; exit code 1 unless every gate passes and every
    unit ran (and, with ``strict``, no PASS is underpowered)."""
    executor = make_executor(plan, ray_address)
    note(
        f"quantship signoff: {len(plan.models)} model(s) x {len(plan.targets)} target(s) on {plan.data} -> "
        f"{out_dir} (resumable: run again to continue)"
        + ("" if executor.name == "local" else f"; executor {executor.name}: {executor.description}")
    )
    rows, verdict_rows = signoff(plan, out_dir, executor=executor)
    md, page = build_report(out_dir, f"sign-off: {plan.name}")
    lines = [text_table(load_results(out_dir)["verdicts"], VERDICT_COLUMNS)]
    failed_units = [r for r in rows if r.get("status") == "failed"]
    lines += [f"FAILED {r['model']} {r['target']}: {r['error']}" for r in failed_units]
    overall = overall_verdict(verdict_rows, len(failed_units))
    lines.append(f"\n{overall.headline}. Report: {page}, {md}")
    if overall.underpowered:
        lines.append(
            "underpowered: the point values clear these gates but their intervals do not; "
            + ("--strict / strict: true fails the run on it" if plan.strict else "exit 0 (--strict fails on it)")
        )
    nonfinite = nonfinite_error(rows, plan.allow_nonfinite, "allow_nonfinite: true (or --allow-nonfinite)")
    if nonfinite:
        lines.append(nonfinite)
    return JobResult(rows, lines, 1 if nonfinite else overall.exit_code(plan.strict))
