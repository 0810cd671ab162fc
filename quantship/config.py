"""Typed configuration: preprocessing, targets, calibration and evaluation specs, with JSON/YAML I/O."""

from __future__ import annotations

import dataclasses
import enum
import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from quantship.errors import ConfigError


def _choice(enum_cls: type[enum.Enum], value: Any, what: str) -> Any:
    if isinstance(value, enum_cls):
        return value
    try:
        return enum_cls(str(value).lower())
    except ValueError:
        names = ", ".join(m.value for m in enum_cls)
        raise ConfigError(f"unknown {what} '{value}'; choose one of: {names}") from None


class Interpolation(str, enum.Enum):
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    AREA = "area"
    # PIL's bilinear resize, which widens the filter when shrinking (antialiasing), as torchvision's
    # Resize does on PIL images; OpenCV's INTER_LINEAR samples 2x2 pixels whatever the scale.
    BILINEAR_ANTIALIAS = "bilinear_antialias"


class ChannelOrder(str, enum.Enum):
    RGB = "rgb"
    BGR = "bgr"


class Layout(str, enum.Enum):
    NHWC = "nhwc"
    NCHW = "nchw"


class ResizeMode(str, enum.Enum):
    SHORTER_CROP = "shorter_crop"  # classification: shorter side to crop / crop_pct, then a centre crop
    STRETCH = "stretch"  # detection (SSD): the whole image resized to the input size, aspect not kept


class CropMode(str, enum.Enum):
    """How many views of each image are evaluated; the model's outputs are averaged over the views."""

    CENTER = "center"  # one centre crop
    TEN = "10crop"  # 4 corners + centre, and their mirror images
    TWELVE = "12crop"  # the 10 crops + the whole image resized to the crop size, and its mirror


# Normalisation families of the field; mean/std are per channel in RGB order on the 0..255 scale.
NORMALIZATION_MODES: dict[str, dict[str, Any]] = {
    "caffe": {"mean": (123.68, 116.779, 103.939), "std": (1.0, 1.0, 1.0), "channel_order": ChannelOrder.BGR},
    "tf": {"mean": (127.5, 127.5, 127.5), "std": (127.5, 127.5, 127.5), "channel_order": ChannelOrder.RGB},
    "torch": {
        "mean": (123.675, 116.28, 103.53),
        "std": (58.395, 57.12, 57.375),
        "channel_order": ChannelOrder.RGB,
    },
    "raw": {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0), "channel_order": ChannelOrder.RGB},
}


@dataclass(frozen=True)
class PreprocessSpec:
    """Classification preprocessing as data: resize the shorter side, crop, normalise, order, layout.

    The shorter side is resized to ``round(crop / crop_pct)`` and the centre ``crop`` x ``crop`` is taken
    (``crop_pct=1`` resizes straight to the crop). Pixel values are ``(x - mean) / std`` per channel, with
    mean/std given in RGB order on the 0..255 scale, applied before any channel reordering.
    """

    size: tuple[int, int] = (224, 224)
    crop_pct: float = 0.875
    interpolation: Interpolation = Interpolation.BILINEAR
    mean: tuple[float, float, float] = (127.5, 127.5, 127.5)
    std: tuple[float, float, float] = (127.5, 127.5, 127.5)
    channel_order: ChannelOrder = ChannelOrder.RGB
    layout: Layout = Layout.NHWC
    crops: CropMode = CropMode.CENTER
    resize: ResizeMode = ResizeMode.SHORTER_CROP

    def __post_init__(self) -> None:
        def triple(v: Any, what: str) -> tuple[float, ...]:
            vals = [v] * 3 if isinstance(v, (int, float)) else list(v)
            try:
                return tuple(float(x) for x in vals)
            except (TypeError, ValueError):
                raise ConfigError(f"preprocess {what} must be numbers, got {v!r}") from None

        size = [self.size] * 2 if isinstance(self.size, int) else list(self.size)
        try:
            object.__setattr__(self, "size", tuple(int(s) for s in size))
        except (TypeError, ValueError):
            raise ConfigError(f"preprocess size must be N or (H, W), got {self.size!r}") from None
        object.__setattr__(self, "mean", triple(self.mean, "mean"))
        object.__setattr__(self, "std", triple(self.std, "std"))
        object.__setattr__(self, "interpolation", _choice(Interpolation, self.interpolation, "interpolation"))
        object.__setattr__(self, "channel_order", _choice(ChannelOrder, self.channel_order, "channel order"))
        object.__setattr__(self, "layout", _choice(Layout, self.layout, "layout"))
        object.__setattr__(self, "crops", _choice(CropMode, self.crops, "crop mode"))
        object.__setattr__(self, "resize", _choice(ResizeMode, self.resize, "resize mode"))
        if len(self.size) != 2 or min(self.size) <= 0:
            raise ConfigError(f"preprocess size must be two positive integers, got {self.size}")
        if not 0.1 <= self.crop_pct <= 1.0:
            raise ConfigError(f"crop_pct must be in [0.1, 1.0], got {self.crop_pct}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError("mean and std need three values each, std positive")

    @classmethod
    def from_mode(cls, mode: str, **overrides: Any) -> "PreprocessSpec":
        """Build a spec from a named normalisation family (caffe, tf, torch, raw) plus overrides."""
        if mode not in NORMALIZATION_MODES:
            raise ConfigError(f"unknown normalisation mode '{mode}'; choose one of: {', '.join(NORMALIZATION_MODES)}")
        return cls(**{**NORMALIZATION_MODES[mode], **overrides})

    @property
    def resize_shorter(self) -> int:
        return int(round(min(self.size) / self.crop_pct))

    def with_overrides(self, **overrides: Any) -> "PreprocessSpec":
        """Return a copy with user overrides applied (``mode=`` expands to mean/std/channel order)."""
        overrides = {k: v for k, v in overrides.items() if v is not None}
        mode = overrides.pop("mode", None)
        if mode is not None:
            if mode not in NORMALIZATION_MODES:
                raise ConfigError(
                    f"unknown normalisation mode '{mode}'; choose one of: {', '.join(NORMALIZATION_MODES)}"
                )
            overrides = {**NORMALIZATION_MODES[mode], **overrides}
        known = {f.name for f in fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise ConfigError(f"unknown preprocessing option(s): {', '.join(sorted(unknown))}")
        return replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=lambda o: o.value))

    def hash(self) -> str:
        from quantship.fileio import sha256_json

        return sha256_json(self.to_dict())[:16]


class Backend(str, enum.Enum):
    KERAS = "keras"
    TFLITE = "tflite"
    ONNX = "onnx"
    TENSORRT = "trt"


class Precision(str, enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    DYNAMIC = "dynamic"  # int8 weights, float activations (TFLite dynamic-range)
    INT8 = "int8"
    INT16X8 = "int16x8"  # int16 activations, int8 weights


class IODType(str, enum.Enum):
    """Input/output type of a full-integer TFLite model."""

    FLOAT32 = "float32"
    INT8 = "int8"
    UINT8 = "uint8"


@dataclass(frozen=True)
class TargetSpec:
    """One thing to evaluate: a runtime at a precision (and calibration method where it applies)."""

    name: str
    backend: Backend
    precision: Precision
    calibration: str | None = None  # max / entropy / percentile / mse, for int8 ONNX and TensorRT
    io_dtype: IODType = IODType.FLOAT32
    description: str = ""

    @property
    def needs_calibration(self) -> bool:
        return self.precision in (Precision.INT8, Precision.INT16X8)


@dataclass(frozen=True)
class CalibrationSpec:
    """How the calibration split is drawn and used."""

    num_images: int = 100
    seed: int = 0
    method: str = "entropy"
    percentile: float = 99.99
    batch_size: int = 1


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
    options: dict[str, Any] = field(default_factory=dict)  # backend options (trt_workspace_mb, ...)


@dataclass(frozen=True)
class Gate:
    """An accuracy gate on targets against the reference.

    Exactly one of ``relative`` (target >= relative * reference, e.g. 0.99) and ``max_drop_points``
    (reference - target <= N percentage points) is set. ``targets`` holds glob patterns (default: all).
    """

    metric: str = "top1"
    relative: float | None = None
    max_drop_points: float | None = None
    targets: tuple[str, ...] = ("*",)

    def __post_init__(self) -> None:
        if (self.relative is None) == (self.max_drop_points is None):
            raise ConfigError(f"gate on {self.metric}: give exactly one of 'relative' and 'max_drop_points'")
        if self.relative is not None and not 0 < self.relative <= 1.5:
            raise ConfigError(f"gate on {self.metric}: relative must be in (0, 1.5], got {self.relative}")
        if self.metric not in ("top1", "top5", "mAP"):
            raise ConfigError(f"gate metric must be top1, top5 (classification) or mAP (detection), got '{self.metric}'")
        if self.max_drop_points is not None and self.max_drop_points < 0:
            raise ConfigError(f"gate on {self.metric}: max_drop_points must not be negative")

    def applies(self, target: str) -> bool:
        import fnmatch

        return any(fnmatch.fnmatch(target, pat) for pat in self.targets)

    def describe(self) -> str:
        if self.relative is not None:
            return f"{self.metric} >= {self.relative:g} x reference"
        return f"{self.metric} drop <= {self.max_drop_points:g} points"


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
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "plan") -> "SignoffPlan":
        d = dict(d)
        known = {f.name for f in fields(cls)} | {"dataset"}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
        if "dataset" in d:
            d["data"] = d.pop("dataset")
        for key in ("models", "targets", "data", "gates"):
            if not d.get(key):
                raise ConfigError(f"{source}: '{key}' is required")
        try:
            models = tuple(PlanModel(m) if isinstance(m, str) else PlanModel(**m) for m in d.pop("models"))
            gates = tuple(Gate(**{**g, "targets": tuple(g.get("targets", ("*",)))}) for g in d.pop("gates"))
            calib = CalibrationSpec(**d.pop("calibration", {}))
        except TypeError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        targets = d.pop("targets")
        targets = tuple(t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets))
        return cls(models=models, targets=targets, gates=gates, calibration=calib, **d)

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
