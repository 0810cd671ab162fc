"""``quantship convert``: write each target's artifact and manifest under ``out_dir/artifacts``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from quantship.config import PtqSteps, TrtOptions
from quantship.data.datasets import load_dataset
from quantship.errors import ConfigError
from quantship.jobs import JobResult
from quantship.jobs.common import build_targets, calibration_data, draw_calibration, load_for
from quantship.manifest import Artifact
from quantship.models.loading import resolve_preprocess
from quantship.runtime.base import RunnerOptions
from quantship.targets import QUANTIZED_WEIGHTS, BuildContext, needs_calibration, parse_targets


def convert_artifacts(
    model: str,
    targets: str | Sequence[str],
    out_dir: Path,
    weights: str | None = None,
    data: str | None = None,
    labels: str | None = None,
    calib_images: int = 100,
    calib_seed: int = 0,
    preprocess_overrides: dict[str, Any] | None = None,
    workers: int = 4,
    threads: int | None = None,
    trt: TrtOptions = TrtOptions(),
    ptq: PtqSteps = PtqSteps(),
) -> dict[str, Artifact | None]:
    """Build the artifacts of ``targets`` (``data`` is read as calibration data only)."""
    chosen = parse_targets(targets)
    preprocess = resolve_preprocess(model, weights, preprocess_overrides)
    calibrated = needs_calibration(chosen, trt)
    if ptq.active and not calibrated:
        # The steps read calibration images too (the dynamic-range TFLite target needs none otherwise).
        calibrated = [t for t in chosen if t.spec.precision in QUANTIZED_WEIGHTS]
    if calibrated and not data:
        names = ", ".join(t.name for t in calibrated)
        raise ConfigError(
            f"{names} need calibration images: pass --data KIND:PATH (calibration draws --calib-images from it)"
        )
    dataset = load_dataset(data, labels=labels) if calibrated else None
    loaded = load_for(model, weights, preprocess)
    ctx = BuildContext(
        loaded,
        Path(out_dir),
        runner_options=RunnerOptions(threads=threads),
        trt=trt,
        log_path=Path(out_dir) / "convert.log",
        ptq=ptq,
    )
    if dataset is not None:
        ctx.calibration = calibration_data(draw_calibration(dataset, calib_images, calib_seed), loaded, workers=workers)
    try:
        return build_targets(ctx, chosen)
    finally:
        ctx.close()


def run_convert(model: str, targets: str | Sequence[str], out_dir: Path, **kwargs: Any) -> JobResult:
    """``quantship convert``: the artifacts and a line per artifact."""
    artifacts = convert_artifacts(model, targets, out_dir, **kwargs)
    lines = [
        f"{name:22s} {art.path}  ({art.manifest['size_bytes'] / 1e6:.2f} MB, manifest {art.manifest_path.name})"
        for name, art in artifacts.items()
        if art is not None
    ]
    return JobResult([{"target": n, "artifact": str(a.path)} for n, a in artifacts.items() if a is not None], lines)
