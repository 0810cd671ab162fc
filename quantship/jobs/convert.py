"""``quantship convert``: write each target's artifact and manifest under ``out_dir/artifacts``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from quantship.config import PtqSteps, TrtOptions
from quantship.data.datasets import load_dataset
from quantship.errors import ConfigError
from quantship.fileio import FolderLock
from quantship.jobs import JobResult
from quantship.manifest import Artifact
from quantship.models.loading import resolve_preprocess
from quantship.runtime.base import RunnerOptions
from quantship.targets import BuildContext, needs_calibration, parse_targets
from quantship.targets.run import build_targets, calibration_data, draw_listed_calibration, load_for


def convert_artifacts(
    model: str,
    targets: str | Sequence[str],
    out_dir: Path,
    weights: str | None = None,
    data: str | None = None,
    labels: str | None = None,
    calib_images: int = 100,
    calib_seed: int = 0,
    calib_list: str | None = None,
    calib_percentile: float = 99.99,
    preprocess_overrides: dict[str, Any] | None = None,
    workers: int = 4,
    threads: int | None = None,
    trt: TrtOptions = TrtOptions(),
    allow_missing_images: bool = False,
    trust_savedmodel: bool = False,
    ptq: PtqSteps = PtqSteps(),
) -> tuple[dict[str, Artifact | None], dict[str, str]]:
    """Build the artifacts of ``targets`` (``data`` is read as calibration data only, restricted to the files
    ``calib_list`` names when given); returns the artifacts and an error message per target that failed to
    build."""
    chosen = parse_targets(targets)
    preprocess = resolve_preprocess(model, weights, preprocess_overrides)
    calibrated = needs_calibration(chosen, trt, ptq)
    if calibrated and not data:
        names = ", ".join(t.name for t in calibrated)
        raise ConfigError(
            f"{names} need calibration images: pass --data KIND:PATH (calibration draws --calib-images from it)"
        )
    dataset = load_dataset(data, labels=labels, allow_missing_images=allow_missing_images) if calibrated else None
    drawn = draw_listed_calibration(dataset, calib_images, calib_seed, calib_list) if dataset is not None else None
    loaded = load_for(model, weights, preprocess, trust_savedmodel=trust_savedmodel)
    ctx = BuildContext(
        loaded,
        Path(out_dir),
        runner_options=RunnerOptions(threads=threads),
        trt=trt,
        log_path=Path(out_dir) / "convert.log",
        ptq=ptq,
    )
    if drawn is not None:
        ctx.calibration = calibration_data(
            drawn[0], loaded, workers=workers, percentile=calib_percentile, source=drawn[1]
        )
    try:
        return build_targets(ctx, chosen)
    finally:
        ctx.close()


def run_convert(model: str, targets: str | Sequence[str], out_dir: Path, **kwargs: Any) -> JobResult:
    """``quantship convert``: the artifacts and a line per artifact; exit code 1 when a target failed to build."""
    with FolderLock(out_dir, f"quantship convert {model}"):
        artifacts, failures = convert_artifacts(model, targets, out_dir, **kwargs)
    lines = [
        f"{name:22s} {art.path}  ({art.manifest['size_bytes'] / 1e6:.2f} MB, manifest {art.manifest_path.name})"
        for name, art in artifacts.items()
        if art is not None
    ]
    lines += [f"FAILED {name}: {error}" for name, error in failures.items()]
    rows = [{"target": n, "artifact": str(a.path)} for n, a in artifacts.items() if a is not None]
    rows += [{"target": n, "status": "failed", "error": e} for n, e in failures.items()]
    return JobResult(rows, lines, 1 if failures else 0)
