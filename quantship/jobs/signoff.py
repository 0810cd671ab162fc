"""``quantship signoff PLAN.yaml``: run the plan (:mod:`quantship.signoff`), build the report, decide the exit code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quantship.errors import ConfigError
from quantship.evaluate.report import VERDICT_COLUMNS, build_report, load_results
from quantship.evaluate.results import text_table
from quantship.evaluate.verdicts import overall_verdict
from quantship.jobs import JobResult
from quantship.jobs.eval import remote_runners
from quantship.jobs.remote_engine import RemoteEngineBuilder
from quantship.progress import note
from quantship.remote.bench import RemoteBenchWorker
from quantship.remote.host import DeviceSession
from quantship.signoff.plan import SignoffPlan
from quantship.signoff.run import make_executor, signoff
from quantship.signoff.units import LocalExecutor
from quantship.targets.run import nonfinite_error

__all__ = ["SignoffPlan", "run_signoff"]


def run_signoff(plan: SignoffPlan, out_dir: Path, ray_address: str | None = None) -> JobResult:
    """``quantship signoff``: run or resume, build the report; exit code 1 unless every gate passes and every
    unit ran (and, with ``strict``, no PASS is underpowered)."""
    if plan.remote is not None:
        if ray_address is not None:
            raise ConfigError("a plan with remote: runs through the local executor; drop --ray-address")
        with DeviceSession(plan.remote) as session:  # an unreachable or unfit device: said before any work
            return _run(plan, out_dir, _remote_executor(session), session)
    return _run(plan, out_dir, make_executor(plan, ray_address))


def _remote_executor(session: Any) -> Any:
    """The local executor with every artifact run (and every TensorRT engine built) on the session's device."""

    copied: dict[str, bool] = {}

    def fields(target: str) -> dict[str, Any] | None:
        return {**session.fields(), "artifact_copied": copied[target]} if target in copied else None

    return LocalExecutor(
        make_runner=remote_runners(session, copied),
        engine_builder=RemoteEngineBuilder(session),
        remote_fields=fields,
        make_bench_worker=lambda cfg: RemoteBenchWorker(session, cfg),
    )


def _run(plan: SignoffPlan, out_dir: Path, executor: Any, session: Any = None) -> JobResult:
    if session is not None:
        note(f"every artifact runs on {session.url} ({session.environment.get('cpu')}); the reference runs here")
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
        consequence = (
            "--strict / strict: true fails the run on it"
            if plan.strict
            else "the run passes (--strict fails on it)"
            if overall.verdict == "PASS"
            else "more images would settle them"
        )
        lines.append(f"underpowered: the point values clear these gates but their intervals do not; {consequence}")
    nonfinite = nonfinite_error(rows, plan.allow_nonfinite, "allow_nonfinite: true (or --allow-nonfinite)")
    if nonfinite:
        lines.append(nonfinite)
    return JobResult(rows, lines, 1 if nonfinite else overall.exit_code(plan.strict))
