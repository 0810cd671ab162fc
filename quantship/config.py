"""Typed configuration: preprocessing, targets, calibration and evaluation specs, with JSON/YAML I/O."""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
import json
import math
import os
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from quantship.errors import ConfigError
from quantship.fileio import sha256_json


def parse_choice(enum_cls: type[enum.Enum], value: Any, what: str) -> Any:
    """``value`` as a member of ``enum_cls`` (a member or its value), else a ConfigError naming ``what``."""
    if isinstance(value, enum_cls):
        return value
    try:
        return enum_cls(str(value).lower())
    except ValueError:
        names = ", ".join(m.value for m in enum_cls)
        raise ConfigError(f"unknown {what} '{value}'; choose one of: {names}") from None


_choice = parse_choice  # the short name this module's readers use


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


class CentreOffset(str, enum.Enum):
    """Where the centre crop starts when the margin (resized side - crop side) is odd."""

    FLOOR = "floor"  # margin // 2: TensorFlow's central_crop, Keras
    ROUND = "round"  # int(round(margin / 2)), half to even: torchvision's CenterCrop (and timm's)


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


MAX_INPUT_SIZE = 8192  # pixels per side of a model input
MIN_STD = 1e-3  # smallest std (0..255 scale): 255 / 1e-3 is still a finite, if huge, input


# How the longer side is sized when the shorter one is resized to N: torchvision's Resize(N) truncates
# (int(N * long / short)); it was rounded before. Part of every preprocessing hash and input-cache key, so results
# and cached pixels made under the old rule are never reused.
RESIZE_LONG_SIDE = "floor"


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
    centre: CentreOffset = CentreOffset.FLOOR

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
        object.__setattr__(self, "centre", _choice(CentreOffset, self.centre, "centre crop offset"))
        if len(self.size) != 2 or min(self.size) <= 0 or max(self.size) > MAX_INPUT_SIZE:
            raise ConfigError(f"preprocess size must be two integers in 1..{MAX_INPUT_SIZE}, got {self.size}")
        try:
            crop_pct = float(self.crop_pct)
        except (TypeError, ValueError):
            raise ConfigError(f"preprocess crop_pct must be a number, got {self.crop_pct!r}") from None
        object.__setattr__(self, "crop_pct", crop_pct)
        if not 0.1 <= self.crop_pct <= 1.0:
            raise ConfigError(f"crop_pct must be in [0.1, 1.0], got {self.crop_pct}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ConfigError("mean and std need three values each")
        # A NaN mean or a std of 1e-30 turns every pixel into NaN or inf: every target would then "predict" one
        # class and be scored as if it had run.
        if not all(math.isfinite(v) for v in (*self.mean, *self.std)):
            raise ConfigError(f"preprocess mean and std must be finite numbers, got mean={self.mean}, std={self.std}")
        if min(self.std) < MIN_STD:
            raise ConfigError(
                f"preprocess std must be at least {MIN_STD:g} (on the 0..255 pixel scale), got {self.std}; "
                "e.g. std=58.395/57.12/57.375, or mode=raw for none"
            )

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
        return sha256_json({**self.to_dict(), "resize_long_side": RESIZE_LONG_SIDE})[:16]


def parse_preprocess_overrides(text: str | None, where: str = "--preprocess") -> dict[str, Any]:
    """``mode=tf,size=224,crop_pct=0.875,interpolation=bicubic,layout=nchw,crops=10crop`` -> dict (the form of
    ``--preprocess`` and of a plan model's ``preprocess:`` string); values are checked when the spec is made.

    Raises:
        ConfigError: An item that is not ``key=value``, an empty value, or a malformed number.
    """
    if not text or not text.strip():
        return {}
    out: dict[str, Any] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise ConfigError(f"{where} expects key=value pairs separated by commas, got '{item.strip()}'")
        if key == "size":
            parts = value.lower().replace("x", " ").split()
            try:
                nums = [int(p) for p in parts]
            except ValueError:
                raise ConfigError(f"{where} size must be N or HxW, got '{value}'") from None
            if len(nums) not in (1, 2):
                raise ConfigError(f"{where} size must be N or HxW, got '{value}'")
            out["size"] = (nums[0], nums[-1])
        elif key == "crop_pct":
            try:
                out[key] = float(value)
            except ValueError:
                raise ConfigError(f"{where} {key} must be a number, got '{value}'") from None
        elif key in ("mean", "std"):
            try:
                vals = [float(v) for v in value.split("/")]
            except ValueError:
                raise ConfigError(f"{where} {key} expects three numbers separated by '/', got '{value}'") from None
            if len(vals) not in (1, 3):
                raise ConfigError(f"{where} {key} expects one or three numbers separated by '/', got '{value}'")
            out[key] = tuple(vals * 3 if len(vals) == 1 else vals)
        else:
            out[key] = value
    return out


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


class CalibrationMethod(str, enum.Enum):
    """How a tensor's int8 range is chosen from its calibration statistics."""

    MAX = "max"
    ENTROPY = "entropy"
    PERCENTILE = "percentile"
    MSE = "mse"
    AUTO = "auto"  # per layer, the one of the four above with the smallest output error on calibration images

    @classmethod
    def parse(cls, value: Any) -> "CalibrationMethod":
        return _choice(cls, value, "calibration method")


class TrtInt8Mode(str, enum.Enum):
    """TensorRT int8: ranges from TensorRT's own calibrator (implicit, TensorRT 10 only) or from the Q/DQ
    nodes of the ONNX model (explicit, TensorRT 10 and 11)."""

    IMPLICIT = "implicit"
    EXPLICIT = "explicit"


@dataclass(frozen=True)
class TargetSpec:
    """One thing to evaluate: a runtime at a precision (and calibration method where it applies).

    Attributes:
        name: Canonical target name (``tflite-int8``).
        backend: Name of the runtime in the runtime registry (``keras``, ``tflite``, ``onnx``, ``trt``, or a
            runtime registered by the user).
        precision: Numeric precision of the artifact.
        calibration: Calibration method for int8 targets whose ranges come from our calibrators.
        io_dtype: I/O type of a full-integer TFLite model.
        trt_int8: For TensorRT int8: implicit (TensorRT's calibrator) or explicit (Q/DQ).
        description: One line for ``quantship targets``.
    """

    name: str
    backend: str
    precision: Precision
    calibration: CalibrationMethod | None = None
    io_dtype: IODType = IODType.FLOAT32
    trt_int8: TrtInt8Mode | None = None
    description: str = ""

    @property
    def needs_calibration(self) -> bool:
        return self.precision in (Precision.INT8, Precision.INT16X8)


@dataclass(frozen=True)
class CalibrationSpec:
    """How the calibration images are chosen and used.

    Attributes:
        num_images: Calibration images (disjoint from the evaluation images), drawn (seeded) from the
            calibration source.
        seed: Seed of the draw.
        method: Calibration of targets whose name carries no method (``trt-int8-qdq``); None: their default.
        percentile: The percentile of the ``percentile`` method.
        batch_size: Batch size of the calibration passes (and of TensorRT's calibrator).
        data: A separate calibration dataset (``KIND:PATH``, e.g. ``images:/data/train-subset``); None draws
            calibration images from the evaluation data, disjoint from the evaluated ones.
        list: A file naming the calibration images, one file name (or relative path) per line (MLPerf's
            ``cal_image_list_option_1.txt``): calibration is drawn only from the listed files.
    """

    num_images: int = 100
    seed: int = 0
    method: CalibrationMethod | None = None
    percentile: float = 99.99
    batch_size: int = 8
    data: str | None = None
    list: str | None = None

    def __post_init__(self) -> None:
        if self.method is not None:
            object.__setattr__(self, "method", CalibrationMethod.parse(self.method))
        if not 0.0 < float(self.percentile) <= 100.0:
            raise ConfigError(f"calibration percentile must be in (0, 100], got {self.percentile}")
        for name in ("data", "list"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (str, Path)) or not str(value).strip()):
                raise ConfigError(f"calibration {name} must be a path string, got {value!r}")
            if value is not None:
                object.__setattr__(self, name, str(value))


@dataclass(frozen=True)
class InputCacheOptions:
    """The preprocessed-input cache (``quantship.data.cache``).

    Attributes:
        enabled: False decodes every image on every pass (``--no-input-cache``).
        path: Cache folder; None: ``inputs/`` under the project cache folder (``$QUANTSHIP_CACHE`` or
            ``~/.cache/quantship``).
        max_gb: Size cap; least recently used datasets are evicted beyond it (never one in use).
    """

    enabled: bool = True
    path: Path | None = None
    max_gb: float = 20.0

    def __post_init__(self) -> None:
        if self.path is not None and not isinstance(self.path, Path):
            object.__setattr__(self, "path", Path(self.path).expanduser())
        if not self.max_gb > 0:
            raise ConfigError(f"--input-cache-max-gb must be a positive number, got {self.max_gb}")


RELU6_MODES = ("keep", "calibration", "relu")


# ``post_training: auto`` scores its candidates on every 4th calibration image, and needs at least 2 of them.
AUTO_HOLD_OUT_EVERY = 4
AUTO_MIN_HELD_OUT = 2


@dataclass(frozen=True)
class AdaRoundOptions:
    """Budget of AdaRound (see :mod:`quantship.convert.adaround`): the paper's loss and schedule, fewer steps.

    Attributes:
        iterations: Adam steps per layer (the paper and AIMET: 10000; the default, with ``positions``, keeps
            MobileNetV2 and EfficientNet-Lite0 within 10 minutes on 2 CPU cores: 1000 steps of 1024 positions
            took over 10 CPU minutes on MobileNetV2, the late layers' matrix products dominating; on a tiny model
            500 x 512 reduced the layers' output error as much as 1000 x 1024, by 36 %).
        images: Calibration images each layer's output is reconstructed on (the paper: 1024; AIMET: 2000).
        positions: Output positions (over all images and the feature map) each step samples; the paper's step
            takes whole images (a batch of 32 at 56 x 56 is 100352 positions).
    """

    iterations: int = 500
    images: int = 32
    positions: int = 512

    def __post_init__(self) -> None:
        for name, top in (("iterations", 100_000), ("images", 100_000), ("positions", 1_000_000)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
                raise ConfigError(f"adaround {name} must be a whole number from 1 to {top}, got {value!r}")

    @property
    def learning_rate(self) -> float:
        """Adam's step size: the paper's 1e-3 at its 10000 steps, scaled up with fewer steps (capped at 1e-2) so the
        rounding variables can still travel from their start to a decided 0 or 1 within the reduced budget (on a
        tiny model, 200 steps at 1e-3 changed 0.3 % of the roundings and the output error by 2 %; at 1e-2, 2.6 %
        and 40 %)."""
        return min(1e-2, 1e-3 * 10000 / self.iterations)

    def describe(self) -> dict[str, Any]:
        from_paper = {"reg_param": 0.01, "beta": [20, 2], "warm_start": 0.2}
        return {
            "iterations": self.iterations,
            "images": self.images,
            "positions": self.positions,
            "learning_rate": self.learning_rate,
            **from_paper,
        }


@dataclass(frozen=True)
class PtqSteps:
    """Post-training steps applied to the Keras model before quantized targets are exported (recorded in their
    manifests); see :mod:`quantship.convert.ptq`.

    Attributes:
        equalize: Cross-layer equalization (batch norms folded first).
        bias_correct: Bias correction from calibration statistics (batch norms folded first).
        relu6: How equalization passes a ReLU6 (see :mod:`quantship.convert.ptq`): ``keep`` (ReLU6 stays; a
            channel below the clip is only scaled up, until twice its calibration maximum reaches 6: exact
            wherever its values stay below twice that maximum), ``calibration`` (ReLU6 stays; channels are
            scaled either way as far as the clip stays exact on the calibration images) or ``relu`` (the
            published method: ReLU6 between two equalized layers becomes ReLU, which changes the float model).
    """

    equalize: bool = False
    bias_correct: bool = False
    relu6: str = "keep"
    adaround: AdaRoundOptions | None = None
    auto: bool = False

    def __post_init__(self) -> None:
        if self.relu6 not in RELU6_MODES:
            raise ConfigError(f"relu6 mode must be one of {', '.join(RELU6_MODES)}, got '{self.relu6}'")
        if self.auto and (self.equalize or self.bias_correct or self.adaround is not None):
            raise ConfigError(
                "post-training auto chooses the steps itself: give it alone (no equalize, bias correction or adaround)"
            )

    @property
    def active(self) -> bool:
        """Whether targets with int8 weights are built from a changed model (or the steps are searched for)."""
        return self.equalize or self.bias_correct or self.adaround is not None or self.auto

    @property
    def steps(self) -> int:
        """How many steps are applied (the search's tie rule prefers fewer)."""
        return int(self.equalize) + int(self.bias_correct) + int(self.adaround is not None)

    @property
    def label(self) -> str:
        if self.auto:
            return "auto"
        parts = [("equalize" if self.relu6 == "keep" else f"equalize-{self.relu6}")] if self.equalize else []
        parts += ["adaround"] if self.adaround is not None else []
        return "+".join(parts + (["bias-correct"] if self.bias_correct else [])) or "none"

    def describe(self) -> dict[str, Any]:
        # The AdaRound and auto keys appear only when set, so results stored before they existed keep their keys.
        out: dict[str, Any] = {"equalize": self.equalize, "bias_correct": self.bias_correct, "relu6": self.relu6}
        if self.adaround is not None:
            out["adaround"] = self.adaround.describe()
        if self.auto:
            out["auto"] = True
        return out


@dataclass(frozen=True)
class BatchProfile:
    """Optimization profile of the batch dimension (min <= opt <= max); min == max is a fixed batch."""

    min: int = 1
    opt: int = 8
    max: int = 32

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ConfigError(f"batch profile needs 1 <= min <= opt <= max, got {self.min}:{self.opt}:{self.max}")

    @classmethod
    def parse(cls, text: str) -> "BatchProfile":
        """``"8"`` (fixed) or ``"1:8:32"``."""
        try:
            parts = [int(p) for p in str(text).split(":")]
        except ValueError:
            raise ConfigError(f"batch profile must be N or MIN:OPT:MAX, got '{text}'") from None
        if len(parts) == 1:
            return cls(parts[0], parts[0], parts[0])
        if len(parts) != 3:
            raise ConfigError(f"batch profile must be N or MIN:OPT:MAX, got '{text}'")
        return cls(*parts)


@dataclass(frozen=True)
class TrtOptions:
    """Options of the TensorRT targets.

    Attributes:
        batch: Optimization profile of the batch dimension.
        workspace_mb: Builder workspace memory pool limit.
        timing_cache: File to load the timing cache from and save it back to.
        calibration_cache: An explicit TensorRT calibration cache (used as given).
        qdq_method: Calibration of the Q/DQ model behind ``trt-int8-qdq`` (None: entropy).
        cuda_graph: Run engines through captured CUDA graphs.
    """

    batch: BatchProfile = field(default_factory=BatchProfile)
    workspace_mb: int = 2048
    timing_cache: Path | None = None
    calibration_cache: Path | None = None
    qdq_method: CalibrationMethod | None = None
    cuda_graph: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.batch, str):
            object.__setattr__(self, "batch", BatchProfile.parse(self.batch))
        if self.qdq_method is not None:
            object.__setattr__(self, "qdq_method", CalibrationMethod.parse(self.qdq_method))
        for name in ("timing_cache", "calibration_cache"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        if self.workspace_mb <= 0:
            raise ConfigError(f"TensorRT workspace must be positive, got {self.workspace_mb} MiB")


@dataclass(frozen=True)
class Gate:
    """An accuracy gate on targets against the reference.

    Exactly one rule is set: ``relative`` (target >= relative * reference, e.g. 0.99), ``max_drop_points``
    (reference - target <= N percentage points), ``minimum`` (target >= the value, for a metric that must be
    high: ``min:`` in a plan) or ``maximum`` (target <= the value, for a metric that must be low, a distance
    between output distributions: ``max:``). ``targets`` holds glob patterns (default: all). ``decision``:
    ``point`` judges the point value over the whole set (as MLPerf does); ``interval`` passes only when the
    whole confidence interval clears the gate, fails when it misses it entirely and is otherwise INCONCLUSIVE.
    ``score_threshold``: for ``pseudo_map``, the score above which the reference's detections are taken as
    ground truth (None: 0.5).

    Which metrics exist, whether they must be high or low and their ranges are declared by the tasks
    (:mod:`quantship.evaluate.tasks`, ``check_gate``): this record checks only its own shape.
    """

    metric: str = "top1"
    relative: float | None = None
    max_drop_points: float | None = None
    targets: tuple[str, ...] = ("*",)
    decision: str = "point"
    minimum: float | None = None
    maximum: float | None = None
    score_threshold: float | None = None

    def __post_init__(self) -> None:
        given = [k for k in GATE_RULES if getattr(self, k) is not None]
        if len(given) != 1:
            keys = "', '".join(GATE_RULE_KEYS[k] for k in GATE_RULES)
            raise ConfigError(f"gate on {self.metric}: give exactly one of '{keys}'")
        for k in (*GATE_RULES, "score_threshold"):
            v = getattr(self, k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise ConfigError(f"gate on {self.metric}: {GATE_RULE_KEYS.get(k, k)} must be a number, got {v!r}")
        if not isinstance(self.metric, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.metric):
            raise ConfigError(f"gate metric must be a metric name (e.g. top1, agreement_top1), got {self.metric!r}")
        if self.relative is not None and not 0 < self.relative <= 1.5:
            raise ConfigError(f"gate on {self.metric}: relative must be in (0, 1.5], got {self.relative}")
        if self.max_drop_points is not None and not 0 <= self.max_drop_points <= 100:
            raise ConfigError(f"gate on {self.metric}: max_drop_points must be in [0, 100], got {self.max_drop_points}")
        if self.score_threshold is not None and not 0 < self.score_threshold < 1:
            raise ConfigError(f"gate on {self.metric}: score_threshold must be in (0, 1), got {self.score_threshold}")
        if self.decision not in ("point", "interval"):
            raise ConfigError(f"gate on {self.metric}: decision must be 'point' or 'interval', got '{self.decision}'")

    @classmethod
    def parse(cls, text: str) -> "Gate":
        """The command-line form: ``top1>=0.99`` / ``top5>=0.99x`` / ``mAP>=0.95`` / ``agreement_top1>=0.99``
        (relative to the reference), ``drop<=0.5`` / ``top5-drop<=0.5`` (points) or ``mean_l1<=0.3`` (a maximum
        of a metric that must be low). The metric name is checked against the task by ``check_gate``."""
        t = text.replace(" ", "")
        name = r"[A-Za-z_][A-Za-z0-9_]*?"
        if m := re.fullmatch(rf"({name})?>=([0-9.]+)x?", t):
            return cls(metric=m.group(1) or "top1", relative=_number(m.group(2), text))
        if m := re.fullmatch(rf"(?:({name})-?)?(?i:drop)<=([0-9.]+)", t):
            return cls(metric=m.group(1) or "top1", max_drop_points=_number(m.group(2), text))
        if m := re.fullmatch(rf"({name})<=([0-9.]+)", t):
            return cls(metric=m.group(1), maximum=_number(m.group(2), text))
        raise ConfigError(
            f"gate '{text}' not understood; use e.g. 'top1>=0.99' (relative to fp32), 'drop<=0.5' (points) or "
            "'mean_l1<=0.3' (a maximum)"
        )

    def applies(self, target: str) -> bool:
        return any(fnmatch.fnmatch(target, pat) for pat in self.targets)

    @property
    def absolute(self) -> bool:
        """The gate bounds the target's own value (min / max), not its relation to the reference."""
        return self.minimum is not None or self.maximum is not None

    @property
    def higher_is_better(self) -> bool:
        """Whether the gated quantity clears the gate by being at least the threshold (False for ``max``)."""
        return self.maximum is None

    def value(self, target: float, reference: float) -> float:
        """The gated quantity: target / reference (relative gates), target - reference in points (drop gates) or
        the target's own value (min / max gates)."""
        if self.absolute:
            return float(target)
        if self.relative is not None:
            return target / reference if reference > 0 else float("nan")
        return 100.0 * (target - reference)

    def passes_value(self, value: float) -> bool:
        """Whether a gated quantity (as :meth:`value` computes it) clears the gate."""
        if self.maximum is not None:
            return bool(value <= self.maximum)
        return bool(value >= self.threshold)

    def evaluate(self, target: float, reference: float) -> bool:
        """PASS or FAIL on point values of the gate's metric."""
        value = self.value(target, reference)
        return not (isinstance(value, float) and value != value) and self.passes_value(value)

    @property
    def kind(self) -> str:
        return {"relative": "relative", "max_drop_points": "drop_points", "minimum": "min", "maximum": "max"}[
            next(k for k in GATE_RULES if getattr(self, k) is not None)
        ]

    @property
    def threshold(self) -> float:
        """The gated quantity (:meth:`value`) clears the gate when it is >= this (<= for a ``max`` gate)."""
        if self.relative is not None:
            return float(self.relative)
        if self.max_drop_points is not None:
            return -float(self.max_drop_points)
        return float(self.minimum if self.minimum is not None else self.maximum)

    @property
    def pseudo_threshold(self) -> float:
        """The reference's detection score taken as ground truth by ``pseudo_map``."""
        return 0.5 if self.score_threshold is None else float(self.score_threshold)

    def describe(self) -> str:
        what = self.metric
        if self.score_threshold is not None or self.metric == "pseudo_map":
            what = f"{self.metric} (reference detections scoring >= {self.pseudo_threshold:g})"
        if self.relative is not None:
            return f"{what} >= {self.relative:g} x reference"
        if self.max_drop_points is not None:
            return f"{what} drop <= {self.max_drop_points:g} points"
        if self.minimum is not None:
            return f"{what} >= {self.minimum:g}"
        return f"{what} <= {self.maximum:g}"


# A gate's rules: the attribute and the plan key naming it.
GATE_RULES = ("relative", "max_drop_points", "minimum", "maximum")
GATE_RULE_KEYS = {"relative": "relative", "max_drop_points": "max_drop_points", "minimum": "min", "maximum": "max"}


def _number(text: str, where: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"gate '{where}': '{text}' is not a number") from None


# URL schemes of the registered transports (``quantship.remote.transport`` adds each one it registers).
REMOTE_SCHEMES: set[str] = {"ssh"}


@dataclass(frozen=True)
class RemoteURL:
    """A parsed ``scheme://[user@]host[:port]``."""

    scheme: str
    host: str
    user: str | None = None
    port: int | None = None

    @classmethod
    def parse(cls, text: str) -> "RemoteURL":
        """Parse and check a device URL.

        Raises:
            ConfigError: Not ``scheme://[user@]host[:port]``, an unknown scheme, a password, a path, a bad port.
        """
        example = "ssh://[user@]host[:port], e.g. ssh://pi@192.168.1.20"
        raw = str(text).strip()
        if "://" not in raw:
            raise ConfigError(f"--remote {text!r}: expected {example}")
        try:
            parts = urlsplit(raw)
            port = parts.port
        except ValueError as exc:
            raise ConfigError(f"--remote {text!r}: {exc}; expected {example}") from None
        scheme = parts.scheme.lower()
        if scheme not in REMOTE_SCHEMES:
            raise ConfigError(
                f"--remote {text!r}: unknown scheme '{scheme}'; known: {', '.join(sorted(REMOTE_SCHEMES))}"
            )
        if parts.password is not None:
            raise ConfigError(f"--remote: put no password in the URL; use --ssh-key FILE or an ssh agent ({example})")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ConfigError(f"--remote {text!r}: a device URL has no path or query; expected {example}")
        host = parts.hostname or ""
        # The host and user go to ssh as arguments, never through a shell; still refuse what could read as an
        # option (-oProxyCommand=...) or is not a host name at all.
        if not host or host.startswith("-") or not re.fullmatch(r"[A-Za-z0-9._:%\-\[\]]+", host):
            raise ConfigError(f"--remote {text!r}: no valid host name; expected {example}")
        user = parts.username
        if user is not None and (not user or user.startswith("-") or not re.fullmatch(r"[A-Za-z0-9._\-]+", user)):
            raise ConfigError(f"--remote {text!r}: invalid user name '{user}'; expected {example}")
        if port is not None and not 0 < port < 65536:
            raise ConfigError(f"--remote {text!r}: port must be 1..65535")
        return cls(scheme, host, user, port)

    def public(self) -> str:
        """The URL without credentials (what rows and reports record)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        user = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port else ""
        return f"{self.scheme}://{user}{host}{port}"


@dataclass(frozen=True)
class RemoteOptions:
    """Where and how a run reaches the device it measures on (``--remote``).

    Attributes:
        url: ``ssh://[user@]host[:port]`` (the scheme names the transport).
        python: The interpreter on the device (a name on its PATH or a path).
        ssh_key: Identity file passed to ``ssh -i``.
        ssh_options: ``-o K=V`` options passed to the system OpenSSH client, in order.
        cache: Keep artifacts on the device between runs under their content hash.
        connect_timeout: Seconds to wait for the connection (OpenSSH's ``ConnectTimeout``).
        timeout: Seconds: the fixed part of every request's deadline on the device, replacing each request kind's
            default (``--remote-timeout``; None: the defaults, see ``quantship.remote.host.DEADLINES``).
    """

    url: str
    python: str = "python3"
    ssh_key: Path | None = None
    ssh_options: tuple[tuple[str, str], ...] = ()
    cache: bool = True
    connect_timeout: int = 10
    timeout: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.url, str) or not self.url.strip():
            raise ConfigError("--remote: empty URL; give ssh://[user@]host[:port]")
        RemoteURL.parse(self.url)
        if not isinstance(self.python, str) or not self.python.strip() or "\n" in self.python:
            raise ConfigError("--remote-python: give the device's interpreter, e.g. python3 or /usr/bin/python3")
        if self.ssh_key is not None:
            key = Path(self.ssh_key).expanduser()
            if not key.is_file():
                raise ConfigError(f"--ssh-key {self.ssh_key}: no such file; give the private key file")
            object.__setattr__(self, "ssh_key", key)
        options = tuple(parse_ssh_option(o) if isinstance(o, str) else tuple(o) for o in self.ssh_options)
        object.__setattr__(self, "ssh_options", options)
        if not isinstance(self.connect_timeout, int) or not 0 < self.connect_timeout <= 600:
            raise ConfigError(f"remote connect timeout must be 1..600 seconds, got {self.connect_timeout}")
        if self.timeout is not None:
            object.__setattr__(self, "timeout", check_remote_timeout(self.timeout, "--remote-timeout"))


# A week: longer than any engine build; beyond it a deadline is no deadline.
MAX_REMOTE_TIMEOUT = 7 * 24 * 3600.0


def check_remote_timeout(value: Any, where: str) -> float:
    """A request deadline in seconds: a number in (0, one week].

    Raises:
        ConfigError: Naming ``where``.
    """
    try:
        seconds = float(value) if not isinstance(value, bool) else float("nan")
    except (TypeError, ValueError):
        seconds = float("nan")
    if not 0 < seconds <= MAX_REMOTE_TIMEOUT:  # NaN fails too
        raise ConfigError(
            f"{where}: expected seconds in (0, {MAX_REMOTE_TIMEOUT:.0f}] (the deadline of each request to the device), "
            f"got {value!r}"
        )
    return seconds


def parse_ssh_option(text: str) -> tuple[str, str]:
    """``K=V`` (as ``ssh -o`` takes it) -> (K, V).

    Raises:
        ConfigError: No ``=``, an empty key, a line break, or host key checking turned off.
    """
    key, sep, value = str(text).partition("=")
    key, value = key.strip(), value.strip()
    if not sep or not key or not value or any(c in text for c in "\r\n\0") or not key.isalnum():
        raise ConfigError(f"--ssh-option '{text}': expected KEY=VALUE as ssh -o takes it, e.g. Port=2222")
    if key.lower() == "stricthostkeychecking" and value.lower() in ("no", "off"):
        raise ConfigError(
            f"--ssh-option {text}: host key checking stays on; pass StrictHostKeyChecking=accept-new to accept the "
            "key of a host seen for the first time"
        )
    if key.lower() == "batchmode":
        raise ConfigError(f"--ssh-option {text}: quantship never prompts (BatchMode=yes is always set)")
    return key, value


ORT_PROVIDER_ALIASES = ("cpu", "cuda", "tensorrt")  # short names of ONNX Runtime execution providers


def check_ort_provider_names(names: Any, where: str) -> tuple[str, ...]:
    """ONNX Runtime execution providers as written (``--ort-providers``, a plan's ``ort_providers``): a list of
    names or one comma-separated text, each an alias (:data:`ORT_PROVIDER_ALIASES`) or a full ONNX Runtime name
    (``...ExecutionProvider``). Checked without importing ONNX Runtime, so a plan is refused whole whether or not
    a target uses them (whether they are available is checked where one would).

    Raises:
        ConfigError: Naming ``where``: not a list of texts, no name, an empty name (a stray comma), an unknown one.
    """
    items = names.split(",") if isinstance(names, str) else names
    if not isinstance(items, (list, tuple)) or not all(isinstance(t, str) for t in items):
        raise ConfigError(f"{where}: expected provider names, e.g. cpu or CUDAExecutionProvider,CPUExecutionProvider")
    items = [t.strip() for t in items]
    if not items or items == [""]:
        raise ConfigError(f"{where}: no execution provider given, e.g. cpu or CUDAExecutionProvider")
    if "" in items:
        raise ConfigError(f"{where}: an empty provider name in {','.join(items)!r} (a stray comma?)")
    for name in items:
        if name.lower() not in ORT_PROVIDER_ALIASES and not name.endswith("ExecutionProvider"):
            raise ConfigError(
                f"{where}: unknown execution provider '{name}'; give {', '.join(ORT_PROVIDER_ALIASES)} or a full "
                "ONNX Runtime name such as CUDAExecutionProvider"
            )
    return tuple(items)


DEFAULT_MAX_IMAGE_PIXELS = 1 << 27  # a 134-megapixel photo, 400 MB as BGR; a PNG header can claim 50000 x 50000


def max_image_pixels() -> int:
    """Decoded pixels per image at most: ``QUANTSHIP_MAX_IMAGE_PIXELS`` when set, else
    :data:`DEFAULT_MAX_IMAGE_PIXELS`. Read when asked (the CLI asks before any work), not at import.

    Raises:
        ConfigError: The variable is not a whole number >= 1.
    """

    text = os.environ.get("QUANTSHIP_MAX_IMAGE_PIXELS")
    if text is None:
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        value = int(text.strip())
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(
            f"QUANTSHIP_MAX_IMAGE_PIXELS={text!r}: expected a whole number of pixels >= 1 (default "
            f"{DEFAULT_MAX_IMAGE_PIXELS}); unset it for the default"
        )
    return value
