"""The target registry: :class:`Target`, :class:`BuildContext`, :func:`register_target`, and :func:`parse_targets`,
the only place target names are parsed. Each backend registers its targets from its own module
(:mod:`quantship.targets.keras`, ``.tflite``, ``.onnx``, ``.ort_int8``, ``.tensorrt``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from quantship.config import CalibrationMethod, Precision, PtqSteps, TargetSpec, TrtInt8Mode, TrtOptions
from quantship.convert.adaround import CACHE_FORMAT, AdaRoundStore
from quantship.convert.layer_names import KerasLayers
from quantship.convert.ptq import prepare_model
from quantship.errors import ConfigError
from quantship.fileio import sha256_json
from quantship.lazy import lazy_import
from quantship.manifest import Artifact
from quantship.models.loading import LoadedModel
from quantship.runtime.base import Runner, RunnerOptions
from quantship.runtime.registry import get_runtime


@dataclass
class CalibrationData:
    """The calibration batches of a run (a callable, so they are decoded only when a target needs them), what
    identifies them in manifests (count, data hash, source), the percentile of the percentile method and the
    batch size of TensorRT's calibrator."""

    batches: Callable[[], list[np.ndarray]]
    info: dict[str, Any]
    percentile: float | None = None
    batch_size: int = 8
    read: dict[str, int] = field(default_factory=dict)  # once decoded: images read, and skipped as unreadable

    def images_used(self) -> int | None:
        """How many calibration images were read (unreadable ones left out); None before any target decoded
        them."""
        return self.read.get("images")


@dataclass
class BuildContext:
    """What building artifacts and runners for one model needs; shared by all targets of a run."""

    loaded: LoadedModel
    out_dir: Path
    calibration: CalibrationData | None = None
    runner_options: RunnerOptions = field(default_factory=RunnerOptions)
    trt: TrtOptions = field(default_factory=TrtOptions)
    log_path: Path | None = None
    ptq: PtqSteps = field(default_factory=PtqSteps)
    # Builds TensorRT engines somewhere else (``convert --remote``: on the device, with its GPU and TensorRT): an
    # object with ``tensorrt_version`` and ``build_engine(onnx, spec, out, feed, manifest) -> Artifact``.
    engine_builder: Any = None
    _cache: dict[str, Any] = field(default_factory=dict)

    def uses_ptq(self, spec: TargetSpec) -> bool:
        """Whether ``spec`` is built from the model with the post-training steps (targets with int8 weights).
        With ``auto`` this context applies none: the search (:mod:`quantship.targets.post_training`) builds each
        candidate in a context of its own."""
        return self.ptq.active and not self.ptq.auto and spec.precision in QUANTIZED_WEIGHTS

    def keras_model(self, spec: TargetSpec) -> Any:
        """The Keras model ``spec`` converts: with the post-training steps applied (once per run) for targets with
        int8 weights; the loaded model itself otherwise (it stays the fp32 reference)."""
        if not self.uses_ptq(spec):
            return self.loaded.model
        return self._prepared()[0]

    def adaround_store(self) -> Any:
        """Where AdaRound's integers for this run's build key are kept: the model's weights, preprocessing,
        calibration images, the steps before it and its budget, the TensorFlow version."""
        tf = lazy_import("tensorflow")
        key = sha256_json(
            {
                "weights": self.loaded.weights_hash,
                "model": self.loaded.name,
                "preprocess": self.loaded.preprocess.hash(),
                "calibration": self.calibration.info if self.calibration else None,
                "steps": self.ptq.describe(),
                "tensorflow": tf.__version__,
                "format": CACHE_FORMAT,
            }
        )[:16]
        return AdaRoundStore(self.out_dir / "artifacts" / f"{self.loaded.name}-adaround-{key}.npz")

    def _prepared(self) -> tuple[Any, Any]:
        def build() -> tuple[Any, Any]:
            batches = self.calibration.batches if self.calibration else None
            store = self.adaround_store() if self.ptq.adaround is not None else None
            return prepare_model(self.loaded.model, self.ptq, batches, store)

        return self.shared("ptq-model", build)

    def variant(self, spec: TargetSpec) -> str:
        """Key suffix of what is shared between targets built from the same Keras model."""
        return f"+{self.ptq.label}" if self.uses_ptq(spec) else ""

    def shared(self, key: str, factory: Callable[[], Any]) -> Any:
        """One object per run (e.g. the SavedModel export every TFLite precision converts from)."""
        if key not in self._cache:
            self._cache[key] = factory()
        return self._cache[key]

    def close(self) -> None:
        for obj in self._cache.values():
            close = getattr(obj, "close", None)
            if close:
                close()
        self._cache.clear()

    def calibration_batches(self, target: str) -> Callable[[], list[np.ndarray]]:
        if self.calibration is None:
            raise ConfigError(f"{target} needs calibration data")
        return self.calibration.batches

    def base_manifest(self, target: TargetSpec) -> dict[str, Any]:
        lm = self.loaded
        return {
            "target": target.name,
            "backend": target.backend,
            "source_model": {"name": lm.name, "weights": lm.weights, "weights_sha256": lm.weights_hash},
            "preprocess": lm.preprocess.to_dict(),
            "preprocess_hash": lm.preprocess.hash(),
            "calibration": dict(self.calibration.info) if self.calibration else {},
            **({"post_training": self._prepared()[1].to_dict()} if self.uses_ptq(target) else {}),
        }

    def artifact_path(self, target: TargetSpec, suffix: str, variant: str | None = None) -> Path:
        v = self.variant(target) if variant is None else variant
        return self.out_dir / "artifacts" / f"{self.loaded.name}-{target.name}{v}{suffix}"


# Precisions with int8 weights: what the post-training steps (equalization, bias correction) are for.
QUANTIZED_WEIGHTS = (Precision.INT8, Precision.INT16X8, Precision.DYNAMIC)


@dataclass(frozen=True)
class Target:
    """A named target: its spec and how its artifact is built (None for in-memory runtimes).

    Attributes:
        session_config: Runtime session settings this target always runs with (merged into the run's
            :class:`RunnerOptions`).
    """

    spec: TargetSpec
    build: Callable[[BuildContext, TargetSpec], Artifact | None]
    session_config: tuple[tuple[str, str], ...] = ()

    @property
    def name(self) -> str:
        return self.spec.name

    def runner_options(self, ctx: BuildContext) -> RunnerOptions:
        return dataclasses.replace(
            ctx.runner_options, session_config=ctx.runner_options.session_config + self.session_config
        )

    def make_runner(self, ctx: BuildContext, artifact: Artifact | None) -> Runner:
        """The runner of this target's artifact (or of the in-memory model), from the runtime registry."""
        source = artifact.path if artifact is not None else ctx.loaded.model
        return get_runtime(self.spec.backend).make_runner(source, self.runner_options(ctx), self.spec.name)


_TARGETS: dict[str, Target] = {}
_ALIASES: dict[str, str] = {}  # old or alternative name -> canonical name


def register_alias(alias: str, canonical: str) -> None:
    """Accept ``alias`` wherever target names are parsed; rows, keys and manifests use ``canonical``."""
    _ALIASES[alias] = canonical


def register_target(
    spec: TargetSpec,
    build: Callable[[BuildContext, TargetSpec], Artifact | None],
    session_config: Iterable[tuple[str, str]] = (),
) -> Target:
    """Add a target (names are unique; its backend must be a registered runtime)."""
    if spec.name in _TARGETS:
        raise ValueError(f"target '{spec.name}' registered twice")
    get_runtime(spec.backend)
    target = Target(spec, build, tuple(session_config))
    _TARGETS[spec.name] = target
    return target


def unregister_target(name: str) -> None:
    """Remove a target (a plug-in's or a test's)."""
    _TARGETS.pop(name, None)


def get_target(name: str) -> Target:
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _TARGETS:
        raise ConfigError(f"unknown target '{name}'{_suffix_hint(key)}; known targets: {', '.join(_TARGETS)}")
    return _TARGETS[key]


IO_SUFFIXES = ("uint8io", "floatio")  # I/O variants of tflite-int8; any other suffix of a target is a method


def _suffix_hint(key: str) -> str:
    """For ``base-<suffix>``: what suffixes ``base`` takes (calibration methods, I/O types)."""
    base, _, suffix = key.rpartition("-")
    methods = [m.value for m in CalibrationMethod if f"{base}-{m.value}" in _TARGETS]
    ios = [s for s in IO_SUFFIXES if f"{base}-{s}" in _TARGETS]
    if not (methods or ios):
        return ""
    return (
        f" ('{suffix}' is neither a calibration method of {base} ({', '.join(methods) or 'none'}) nor an I/O type "
        f"({', '.join(ios) or 'none'}))"
    )


def parse_targets(names: str | Iterable[str], option: str = "--targets") -> list[Target]:
    """Targets from a comma-separated string or a list of names, in order, without repeats.

    Raises:
        ConfigError: No name at all, or an unknown name.
    """
    items = names.split(",") if isinstance(names, str) else list(names)
    if not all(isinstance(n, str) for n in items):
        raise ConfigError(f"{option}: target names must be strings, got {items!r}")
    out: list[Target] = []
    for n in items:
        if n.strip():
            t = get_target(n)
            if t not in out:
                out.append(t)
    if not out:
        raise ConfigError(f"{option}: no target given; see 'quantship targets'")
    return out


def list_targets() -> list[Target]:
    return list(_TARGETS.values())


# ----------------------------------------------------------------------------------- layer probes (diff)

Capture = dict[str, tuple[np.ndarray, float | None]]  # Keras layer -> (value, NHWC like Keras; quantization step)


class LayerProbe:
    """Runs one target and returns its tensors per Keras layer."""

    name: str
    session_config: tuple[tuple[str, str], ...] = ()
    notes: list[str]
    tensors: dict[str, str]  # layer -> the target's own tensor name

    def run(self, x: np.ndarray) -> Capture: ...

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class ProbeOptions:
    """How ``quantship diff`` runs a probe: CPU threads, ONNX Runtime providers, and whether the Q/DQ targets run
    at ONNX Runtime's default session options instead of as fake-quant."""

    threads: int | None = None
    providers: tuple[str, ...] = ("cpu",)
    qdq_ort_defaults: bool = False


ProbeFactory = Callable[[Target, "Artifact | None", LoadedModel, KerasLayers, ProbeOptions], LayerProbe]
_PROBES: dict[str, ProbeFactory] = {}


def register_layer_probe(backend: str, factory: ProbeFactory) -> None:
    """How ``quantship diff`` reads every intermediate tensor of ``backend``'s targets (per Keras layer)."""
    _PROBES[backend] = factory


def check_layer_probe(target: Target) -> None:
    """Raise :class:`ConfigError` when ``diff`` cannot read ``target``'s tensors."""
    if target.spec.backend not in _PROBES:
        names = list(_PROBES)
        known = ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else "".join(names)
        raise ConfigError(f"diff compares {known} targets; '{target.name}' runs on {target.spec.backend}")


def make_layer_probe(
    target: Target, artifact: Artifact | None, loaded: LoadedModel, layers: KerasLayers, options: ProbeOptions
) -> LayerProbe:
    """The probe that runs ``target`` (built as ``artifact``) and returns its tensors per Keras layer."""
    check_layer_probe(target)
    return _PROBES[target.spec.backend](target, artifact, loaded, layers, options)


DEFAULT_TARGETS = ("keras-fp32", "tflite-fp32", "tflite-fp16", "tflite-dynamic", "tflite-int8", "tflite-int16x8")


DEFAULT_UNNAMED_METHOD = CalibrationMethod.ENTROPY


def needs_calibration(
    targets: Iterable[Target], trt: TrtOptions = TrtOptions(), ptq: PtqSteps = PtqSteps()
) -> list[Target]:
    """The targets that need calibration images (implicit TensorRT int8 can read its ranges from a given
    calibration cache instead; post-training steps need them for every target with int8 weights)."""
    return [
        t
        for t in targets
        if (t.spec.needs_calibration and not (t.spec.trt_int8 is TrtInt8Mode.IMPLICIT and trt.calibration_cache))
        or (ptq.active and t.spec.precision in QUANTIZED_WEIGHTS)
    ]
