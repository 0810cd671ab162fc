"""What a job is asked to do, as typed records: ``quantship eval``'s spec and a sign-off plan."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from quantship.config import CalibrationSpec, Gate, PtqSteps, TrtOptions
from quantship.errors import ConfigError
from quantship.targets import parse_targets, unnamed_method


@dataclass
class EvalSpec:
    """Everything ``quantship eval`` needs; also the record of how a result was produced."""

    model: str
    data: str
    targets: list[str]
    out_dir: Path
    weights: str | None = None
    labels: str | None = None
    limit: int | None = None
    batch_size: int = 8
    threads: int | None = None
    workers: int = 4
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    preprocess_overrides: dict[str, Any] = field(default_factory=dict)
    trt: TrtOptions = field(default_factory=TrtOptions)
    anchors: str | None = None  # anchor configuration of a detection model given as a file
    ptq: PtqSteps = field(default_factory=PtqSteps)  # post-training steps of the quantized targets


@dataclass(frozen=True)
class PlanModel:
    name: str
    weights: str | None = None
    preprocess: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SignoffPlan:
    """A sign-off matrix: models x targets on one dataset, with gates."""

    models: tuple[PlanModel, ...]
    targets: tuple[str, ...]
    data: str
    gates: tuple[Gate, ...]
    reference: str = "keras-fp32"
    labels: str | None = None
    limit: int | None = None
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    batch_size: int = 8
    threads: int | None = None
    workers: int = 4
    chunk_images: int = 256
    bootstrap_samples: int = 1000
    confidence: float = 0.95
    name: str = "signoff"
    anchors: str | None = None
    tensorrt: TrtOptions = field(default_factory=TrtOptions)
    post_training: PtqSteps = field(default_factory=PtqSteps)  # equalize / bias_correct / relu6

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "plan") -> "SignoffPlan":
        d = dict(d)
        known = {f.name for f in fields(cls)} | {"dataset"}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(
                f"{source}: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}"
            )
        if "dataset" in d:
            d["data"] = d.pop("dataset")
        for key in ("models", "targets", "data", "gates"):
            if not d.get(key):
                raise ConfigError(f"{source}: '{key}' is required")
        try:
            models = tuple(PlanModel(m) if isinstance(m, str) else PlanModel(**m) for m in d.pop("models"))
            gates = tuple(Gate(**{**g, "targets": tuple(g.get("targets", ("*",)))}) for g in d.pop("gates"))
            calib = CalibrationSpec(**d.pop("calibration", {}))
            trt = TrtOptions(**d.pop("tensorrt", {}))
            ptq = PtqSteps(**d.pop("post_training", {}))
        except TypeError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        targets = d.pop("targets")
        targets = tuple(t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets))
        method = unnamed_method(parse_targets(targets, "targets"), calib.method, trt.qdq_method, source)
        trt = dataclasses.replace(trt, qdq_method=method)
        return cls(models=models, targets=targets, gates=gates, calibration=calib, tensorrt=trt, post_training=ptq, **d)

    @classmethod
    def load(cls, path: str | Path) -> "SignoffPlan":
        import yaml

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"plan not found: {path}")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a plan is a mapping of keys (models, targets, dataset, gates, ...)")
        return cls.from_dict(data, str(path))
