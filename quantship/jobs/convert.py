"""``quantship convert``: write each target's artifact and manifest under ``out_dir/artifacts``."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from quantship.config import CalibrationSpec, PtqSteps, RemoteOptions, TrtOptions
from quantship.data.datasets import load_dataset
from quantship.errors import ConfigError
from quantship.fileio import FolderLock
from quantship.jobs import JobResult
from quantship.jobs.remote_engine import RemoteEngineBuilder
from quantship.manifest import Artifact
from quantship.models.loading import resolve_preprocess
from quantship.remote.host import DeviceSession
from quantship.runtime.base import RunnerOptions
from quantship.targets import BuildContext, needs_calibration, parse_targets
from quantship.targets.run import build_targets, calibration_data, draw_listed_calibration, load_for


@dataclass
class ConvertSpec:
    """Everything ``quantship convert`` (and ``bench --model``) needs to build artifacts.

    Attributes:
        data: Read as calibration data only (``calibration.list`` restricts it to the files the list names).
        calibration: Count, seed, list and percentile of the calibration images.
    """

    model: str
    targets: str | Sequence[str]
    out_dir: Path
    weights: str | None = None
    data: str | None = None
    labels: str | None = None
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    preprocess_overrides: dict[str, Any] | None = None
    workers: int = 4
    threads: int | None = None
    trt: TrtOptions = field(default_factory=TrtOptions)
    allow_missing_images: bool = False
    trust_savedmodel: bool = False
    ptq: PtqSteps = field(default_factory=PtqSteps)
    remote: RemoteOptions | None = None  # build the TensorRT engines on this device (--remote)


def convert_artifacts(spec: ConvertSpec, session: Any = None) -> tuple[dict[str, Artifact | None], dict[str, str]]:
    """Build the artifacts of ``targets`` (``data`` is read as calibration data only, restricted to the files
    ``calibration.list`` names when given); returns the artifacts and an error message per target that failed to
    build.

    Args:
        session: An open device session (``--remote``): TensorRT engines are built on that device.
    """
    chosen = parse_targets(spec.targets)
    preprocess = resolve_preprocess(spec.model, spec.weights, spec.preprocess_overrides)
    calibrated = needs_calibration(chosen, spec.trt, spec.ptq)
    cal, out_dir = spec.calibration, Path(spec.out_dir)
    if calibrated and not spec.data:
        names = ", ".join(t.name for t in calibrated)
        raise ConfigError(
            f"{names} need calibration images: pass --data KIND:PATH (calibration draws --calib-images from it)"
        )
    dataset = (
        load_dataset(spec.data, labels=spec.labels, allow_missing_images=spec.allow_missing_images)
        if calibrated
        else None
    )
    drawn = draw_listed_calibration(dataset, cal.num_images, cal.seed, cal.list) if dataset is not None else None
    loaded = load_for(spec.model, spec.weights, preprocess, trust_savedmodel=spec.trust_savedmodel)
    ctx = BuildContext(
        loaded,
        out_dir,
        runner_options=RunnerOptions(threads=spec.threads),
        trt=spec.trt,
        log_path=out_dir / "convert.log",
        ptq=spec.ptq,
        engine_builder=_engine_builder(session),
    )
    if drawn is not None:
        ctx.calibration = calibration_data(
            drawn[0], loaded, workers=spec.workers, percentile=cal.percentile, source=drawn[1]
        )
    try:
        return build_targets(ctx, chosen)
    finally:
        ctx.close()


def _engine_builder(session: Any) -> Any:
    if session is None:
        return None

    return RemoteEngineBuilder(session)


def run_convert(spec: ConvertSpec) -> JobResult:
    """``quantship convert``: the artifacts and a line per artifact; exit code 1 when a target failed to build
    (the TensorRT engines are built on ``spec.remote``'s device when given; the other artifacts do not depend on
    where they run)."""
    session = None
    if spec.remote is not None:
        session = DeviceSession(spec.remote)  # a malformed URL is refused here
    with session or contextlib.nullcontext(), FolderLock(spec.out_dir, f"quantship convert {spec.model}"):
        artifacts, failures = convert_artifacts(spec, session=session)
    lines = [
        f"{name:22s} {art.path}  ({art.manifest['size_bytes'] / 1e6:.2f} MB, manifest {art.manifest_path.name})"
        for name, art in artifacts.items()
        if art is not None
    ]
    lines += [f"FAILED {name}: {error}" for name, error in failures.items()]
    rows = [{"target": n, "artifact": str(a.path)} for n, a in artifacts.items() if a is not None]
    rows += [{"target": n, "status": "failed", "error": e} for n, e in failures.items()]
    return JobResult(rows, lines, 1 if failures else 0)
