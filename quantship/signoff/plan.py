"""A sign-off plan as a typed record, and its reader: every key checked (type, range, names) before any work."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any, Iterator

import yaml

from quantship.config import (
    GATE_RULE_KEYS,
    AdaRoundOptions,
    CalibrationSpec,
    Gate,
    PreprocessSpec,
    PtqSteps,
    RemoteOptions,
    TrtInt8Mode,
    TrtOptions,
    check_ort_provider_names,
    check_remote_timeout,
    parse_preprocess_overrides,
    parse_ssh_option,
)
from quantship.data.datasets import dataset_task, labelled_kind
from quantship.errors import ConfigError
from quantship.evaluate.tasks import check_gate
from quantship.fileio import read_text
from quantship.models.loading import check_savedmodel_trust, is_model_file, resolve_preprocess
from quantship.targets import get_target, parse_targets


class ExecutorKind(str, Enum):
    """Where a sign-off's units run: in this process, or as tasks on a Ray cluster."""

    LOCAL = "local"
    RAY = "ray"


@dataclass(frozen=True)
class PlanModel:
    name: str
    weights: str | None = None
    preprocess: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BenchSection:
    """The plan's ``bench:`` section: the report's latency from an interleaved bench pass over the plan's
    artifact files (batch 1, the plan's threads), as ``quantship bench`` times them; not part of any unit key.

    Attributes:
        enabled: ``bench: false`` turns the pass off (the report then shows the evaluation's ms per image).
        ratio_precision, min_rounds, max_seconds, queries_per_round: As ``quantship bench``'s options.
        reference: Target every ratio is taken to (None: the first fp32 target of the same runtime).
    """

    enabled: bool = True
    ratio_precision: float = 0.03
    min_rounds: int = 10
    max_seconds: float = 60.0
    queries_per_round: int = 10
    reference: str | None = None


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
    min_images: int = 1  # a gate resting on fewer evaluated images is INCONCLUSIVE, whatever its decision rule
    name: str = "signoff"
    anchors: str | None = None
    tensorrt: TrtOptions = field(default_factory=TrtOptions)
    ort_providers: tuple[str, ...] = ("cpu",)
    allow_nonfinite: bool = False
    allow_missing_images: bool = False
    trust_savedmodel: bool = False
    executor: ExecutorKind = ExecutorKind.LOCAL  # not part of any unit key: both executors compute the same numbers
    strict: bool = False  # an underpowered PASS (point value clears, interval does not) fails the run
    post_training: PtqSteps = field(default_factory=PtqSteps)  # equalize / bias_correct / relu6
    remote: RemoteOptions | None = None  # every artifact runs on this device (the reference stays here)
    bench: BenchSection = field(default_factory=BenchSection)  # the report's latency; no unit key holds it

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "plan") -> "SignoffPlan":
        """Check the whole plan (every key's type and range, names of models, targets, datasets and gate metrics,
        gates that apply to no target) before any work; each problem is one :class:`ConfigError` naming the key.
        """
        return _PlanReader(source).read(d)

    @classmethod
    def load(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> "SignoffPlan":
        """Read and check a YAML plan; ``overrides`` (command-line flags) replace its keys."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"plan not found: {path}")
        try:
            data = yaml.safe_load(read_text(path, ConfigError))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a plan is a mapping of keys (models, targets, dataset, gates, ...)")
        return cls.from_dict({**data, **(overrides or {})}, str(path))


class _PlanReader:
    """Reads a plan mapping key by key, with one clear error per bad value."""

    def __init__(self, source: str):
        self.source = source

    @contextlib.contextmanager
    def section(self, key: str) -> Iterator[None]:
        """Read a nested mapping: errors inside name ``key`` after the source (``plan: calibration: seed: ...``),
        those of the values' own checks included."""
        self.source, outer = f"{self.source}: {key}", self.source
        try:
            yield
        except ConfigError as exc:
            if str(exc).startswith(self.source):
                raise
            raise ConfigError(f"{self.source}: {exc}") from None
        finally:
            self.source = outer

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {key}: {message}")

    def integer(self, d: dict, key: str, default: Any, minimum: int = 1, optional: bool = False) -> Any:
        value = d.get(key, default)
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.error(key, f"expected a whole number >= {minimum}, got {value!r}")
        return value

    def number(self, d: dict, key: str, default: Any, low: float, high: float) -> float:
        value = d.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value < high:
            raise self.error(key, f"expected a number between {low:g} and {high:g} (exclusive), got {value!r}")
        return float(value)

    def text(self, d: dict, key: str, default: Any = None, optional: bool = True) -> Any:
        value = d.get(key, default)
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value.strip():
            raise self.error(key, f"expected a text value, got {value!r}")
        return value.strip()

    def known(self, d: dict, key: str, known: set[str]) -> None:
        unknown = set(d) - known
        if unknown:
            where = f"{self.source}: {key}" if key else self.source
            raise ConfigError(
                f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}; known: {', '.join(sorted(known))}"
            )

    def flag(self, d: dict, key: str) -> bool:
        value = d.get(key, False)
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {value!r}")
        return value

    def names(self, value: Any, key: str) -> list[str]:
        """A list of names, or one comma-separated text (as ``--targets`` takes)."""
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(t, str) for t in items):
            raise self.error(key, f"expected a list of names (or one comma-separated text), got {value!r}")
        items = [t.strip() for t in items if t.strip()]
        if not items:
            raise self.error(key, "no name given")
        return items

    def read(self, d: dict[str, Any]) -> SignoffPlan:
        d = dict(d)
        self.known(d, "", {f.name for f in fields(SignoffPlan)} | {"dataset"})
        if "dataset" in d:
            if "data" in d:
                raise self.error("dataset", "give 'dataset' or 'data', not both")
            d["data"] = d.pop("dataset")
        for key in ("models", "targets", "data", "gates"):
            if d.get(key) in (None, "", [], {}):
                raise ConfigError(f"{self.source}: '{key}' is required")
        data = self.text(d, "data", optional=False)
        try:
            task, labelled = dataset_task(data), labelled_kind(data)
        except ConfigError as exc:
            raise self.error("dataset", str(exc)) from None
        reference = self.text(d, "reference", "keras-fp32", optional=False)
        try:
            reference = parse_targets([reference], "reference")[0].name
            targets = [t.name for t in parse_targets(self.names(d["targets"], "targets"), "targets")]
        except ConfigError as exc:
            raise ConfigError(f"{self.source}: {exc}") from None
        compared = [t for t in targets if t != reference]
        if not compared:
            raise self.error("targets", f"nothing to compare with the reference {reference}; list other targets")
        flags = {k: self.flag(d, k) for k in ("allow_nonfinite", "allow_missing_images", "trust_savedmodel", "strict")}
        models = self.models(d["models"], flags["trust_savedmodel"])
        gates = self.gates(d["gates"], task, labelled, compared, reference)
        # A section the user wrote must be a mapping (``post_training: []`` is an error, not the defaults); an empty
        # one (``calibration:`` with nothing under it) reads as YAML's null: the defaults.
        calibration = self.calibration({} if d.get("calibration") is None else d["calibration"])
        trt_fields = {} if d.get("tensorrt") is None else d["tensorrt"]
        if calibration.method is not None and isinstance(trt_fields, dict):
            # The method in a target's name is the method used: these two set only trt-int8-qdq's.
            takers = [t for t in targets if get_target(t).spec.trt_int8 is TrtInt8Mode.EXPLICIT]
            if "qdq_method" in trt_fields and takers:
                raise self.error(
                    "tensorrt.qdq_method",
                    f"calibration.method and tensorrt.qdq_method both set the calibration of {', '.join(takers)}: "
                    "keep one",
                )
            trt_fields = {"qdq_method": calibration.method, **trt_fields}
        tensorrt = self.tensorrt(trt_fields)
        name = self.text(d, "name", "signoff", optional=False)
        if "/" in name or "\\" in name or name in (".", ".."):
            raise self.error("name", f"'{name}' names the results folder runs/<name>: no '/' in it")
        return SignoffPlan(
            models=models,
            targets=tuple(targets),
            data=data,
            gates=gates,
            reference=reference,
            labels=self.text(d, "labels"),
            limit=self.integer(d, "limit", None, optional=True),
            calibration=calibration,
            batch_size=self.integer(d, "batch_size", 8),
            threads=self.integer(d, "threads", None, optional=True),
            workers=self.integer(d, "workers", 4),
            chunk_images=self.integer(d, "chunk_images", 256),
            bootstrap_samples=self.integer(d, "bootstrap_samples", 1000),
            confidence=self.number(d, "confidence", 0.95, 0.0, 1.0),
            min_images=self.integer(d, "min_images", 1),
            ort_providers=self.providers(d.get("ort_providers", ["cpu"])),
            name=name,
            anchors=self.text(d, "anchors"),
            tensorrt=tensorrt,
            executor=self.executor(d),
            post_training=self.post_training({} if d.get("post_training") is None else d["post_training"]),
            bench=self.bench(d.get("bench", True), targets),
            remote=self.remote(d),
            **flags,
        )

    def remote(self, d: dict) -> RemoteOptions | None:
        """``remote: ssh://[user@]host[:port]``, or a mapping (url, python, ssh_key, ssh_options, cache, timeout)."""
        if d.get("remote") is None:
            return None
        value = d["remote"]
        if isinstance(value, str):
            value = {"url": value}
        if not isinstance(value, dict):
            raise self.error(
                "remote", f"expected ssh://[user@]host[:port] or a mapping (url, python, ...), got {value!r}"
            )
        self.known(value, "remote", {"url", "python", "ssh_key", "ssh_options", "cache", "timeout"})
        if self.executor(d) is ExecutorKind.RAY:
            raise self.error("remote", "a run on a remote device goes through the local executor: drop executor: ray")
        with self.section("remote"):
            url = self.text(value, "url", optional=False)
            python = self.text(value, "python", "python3", optional=False)
            key = self.text(value, "ssh_key")
            options = value.get("ssh_options") or []
            if isinstance(options, str) or not isinstance(options, list):
                raise self.error("ssh_options", f"expected a list of K=V, got {options!r}")
            cache = self.flag(value, "cache") if "cache" in value else True
            timeout = value.get("timeout")
            if timeout is not None:
                try:
                    timeout = check_remote_timeout(timeout, "timeout")
                except ConfigError as exc:
                    raise self.error("timeout", str(exc).removeprefix("timeout: ")) from None
            try:
                parsed = tuple(parse_ssh_option(str(o)) for o in options)
                options_ = RemoteOptions(
                    url, python=python, ssh_key=key, ssh_options=parsed, cache=cache, timeout=timeout
                )
            except ConfigError as exc:
                raise self.error("", str(exc)) from None
        return options_

    def providers(self, value: Any) -> tuple[str, ...]:
        try:
            return check_ort_provider_names(value, "ort_providers")
        except ConfigError as exc:
            raise ConfigError(f"{self.source}: {exc}") from None

    def post_training(self, value: Any) -> PtqSteps:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return PtqSteps(auto=True)
        if not isinstance(value, dict):
            raise self.error(
                "post_training", f"expected auto or a mapping (equalize, bias_correct, relu6, adaround), got {value!r}"
            )
        self.known(value, "post_training", {"equalize", "bias_correct", "relu6", "adaround"})
        with self.section("post_training"):
            flags = {k: self.flag(value, k) for k in ("equalize", "bias_correct")}
            relu6 = self.text(value, "relu6", "keep", optional=False)
            adaround = self.adaround(value.get("adaround", False))
            try:
                return PtqSteps(**flags, relu6=relu6, adaround=adaround)
            except ConfigError as exc:
                raise self.error("relu6", str(exc)) from None

    def adaround(self, value: Any) -> AdaRoundOptions | None:
        """``adaround: true`` (the default budget), false, or a mapping ``{iterations, images, positions}``."""
        if isinstance(value, bool):
            return AdaRoundOptions() if value else None
        if not isinstance(value, dict):
            raise self.error(
                "adaround", f"expected true, false or a mapping (iterations, images, positions), got {value!r}"
            )
        self.known(value, "adaround", {f.name for f in fields(AdaRoundOptions)})
        with self.section("adaround"):
            defaults = AdaRoundOptions()
            budget = {f.name: self.integer(value, f.name, getattr(defaults, f.name)) for f in fields(AdaRoundOptions)}
            try:
                return AdaRoundOptions(**budget)
            except ConfigError as exc:
                raise self.error(next(iter(value), "iterations"), str(exc)) from None

    def bench(self, value: Any, targets: list[str]) -> BenchSection:
        """``bench: true|false`` or a mapping of :class:`BenchSection`'s fields."""
        if isinstance(value, bool):
            return BenchSection(enabled=value)
        if not isinstance(value, dict):
            raise self.error("bench", f"expected true, false or a mapping (ratio_precision, ...), got {value!r}")
        self.known(value, "bench", {f.name for f in fields(BenchSection)})
        with self.section("bench"):
            enabled = value.get("enabled", True)
            if not isinstance(enabled, bool):
                raise self.error("enabled", f"expected true or false, got {enabled!r}")
            reference = self.text(value, "reference")
            if reference is not None and reference not in targets:
                raise self.error("reference", f"'{reference}' is none of the plan's targets ({', '.join(targets)})")
            max_seconds = value.get("max_seconds", 60.0)
            if isinstance(max_seconds, bool) or not isinstance(max_seconds, (int, float)) or not 0 < max_seconds < 1e6:
                raise self.error("max_seconds", f"expected a positive number of seconds, got {max_seconds!r}")
            return BenchSection(
                enabled=enabled,
                ratio_precision=self.number(value, "ratio_precision", 0.03, 0.0, 1.0),
                min_rounds=self.integer(value, "min_rounds", 10, minimum=2),
                max_seconds=float(max_seconds),
                queries_per_round=self.integer(value, "queries_per_round", 10),
                reference=reference,
            )

    def executor(self, d: dict) -> ExecutorKind:
        value = d.get("executor", ExecutorKind.LOCAL.value)
        try:
            return ExecutorKind(value.strip().lower() if isinstance(value, str) else value)
        except ValueError:
            known = ", ".join(k.value for k in ExecutorKind)
            raise self.error("executor", f"expected one of {known}, got {value!r}") from None

    def models(self, value: Any, trust_savedmodel: bool) -> tuple[PlanModel, ...]:
        if not isinstance(value, list):
            raise self.error("models", f"expected a list of models (names or mappings), got {value!r}")
        out = []
        for i, m in enumerate(value):
            key = f"models[{i}]"
            if isinstance(m, str):
                m = {"name": m}
            if not isinstance(m, dict):
                raise self.error(key, f"expected a model name or a mapping with name, weights, preprocess; got {m!r}")
            self.known(m, key, {"name", "weights", "preprocess"})
            name = self.text(m, "name", optional=False) if "name" in m else None
            if name is None:
                raise self.error(key, "'name' is required (a registry name or a model file)")
            weights = m.get("weights")
            if weights is not None and not isinstance(weights, str):
                raise self.error(f"{key}.weights", f"expected a file name, 'pretrained' or 'random', got {weights!r}")
            preprocess = self.preprocess(m.get("preprocess"), f"{key}.preprocess")
            try:
                for path, option in ((name, "name"), (weights, "weights")):
                    if path is None or path in ("pretrained", "random"):
                        continue
                    if option == "name" and not is_model_file(path):
                        continue
                    file = Path(path).expanduser()
                    if not file.exists():
                        raise ConfigError(f"{option}: file not found: {file}")
                    check_savedmodel_trust(file, trust_savedmodel, f"{option}:")
                resolve_preprocess(name, weights, preprocess)
            except ConfigError as exc:
                text = str(exc).replace("--trust-savedmodel", "trust_savedmodel: true (or --trust-savedmodel)")
                raise self.error(key, text) from None
            out.append(PlanModel(name, weights, preprocess))
        return tuple(out)

    def preprocess(self, value: Any, key: str) -> dict[str, Any]:
        if value is None:
            return {}
        if isinstance(value, str):
            overrides = parse_preprocess_overrides(value, key)
        elif isinstance(value, dict):
            overrides = {str(k): (tuple(v) if isinstance(v, list) else v) for k, v in value.items()}
        else:
            raise self.error(key, f"expected 'mode=tf,size=224,...' (as --preprocess) or a mapping, got {value!r}")
        try:
            PreprocessSpec().with_overrides(**overrides)
        except ConfigError as exc:
            raise self.error(key, str(exc)) from None
        return overrides

    def gates(self, value: Any, task: str, labelled: bool, targets: list[str], reference: str) -> tuple[Gate, ...]:
        if not isinstance(value, list):
            raise self.error("gates", f"expected a list of gates, got {value!r}")
        rules = {plan_key: attr for attr, plan_key in GATE_RULE_KEYS.items()}
        out = []
        for i, g in enumerate(value):
            key = f"gates[{i}]"
            if not isinstance(g, dict):
                raise self.error(
                    key, f"expected a mapping (metric, relative / max_drop_points / min / max, targets), got {g!r}"
                )
            self.known(g, key, {"metric", *rules, "targets", "decision", "score_threshold"})
            metric = g.get("metric", "top1")
            if not isinstance(metric, str):
                raise self.error(f"{key}.metric", f"expected a metric name, got {metric!r}")
            for k in (*rules, "score_threshold"):
                v = g.get(k)
                if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v != v):
                    raise self.error(f"{key}.{k}", f"expected a number, got {v!r}")
            patterns = tuple(self.names(g.get("targets", ["*"]), f"{key}.targets"))
            try:
                gate = Gate(
                    metric,
                    targets=patterns,
                    decision=g.get("decision", "point"),
                    score_threshold=g.get("score_threshold"),
                    **{attr: g.get(k) for k, attr in rules.items()},
                )
                gate = check_gate(gate, task, labelled, f"{key} ({metric})")
            except ConfigError as exc:
                text = str(exc) if str(exc).startswith(key) else f"{key}: {exc}"
                raise ConfigError(f"{self.source}: {text}") from None
            if not any(gate.applies(t) for t in targets):
                raise self.error(
                    f"{key}.targets",
                    f"{list(patterns)} match none of the compared targets ({', '.join(targets)}; the reference "
                    f"{reference} is not gated): this gate would apply to nothing",
                )
            out.append(gate)
        return tuple(out)

    def calibration(self, value: Any) -> CalibrationSpec:
        if not isinstance(value, dict):
            raise self.error("calibration", f"expected a mapping (num_images, seed, method, ...), got {value!r}")
        self.known(value, "calibration", {f.name for f in fields(CalibrationSpec)})
        v = dict(value)
        with self.section("calibration"):
            num = self.integer(v, "num_images", 100)
            seed = self.integer(v, "seed", 0, minimum=0)
            batch = self.integer(v, "batch_size", 8)
            percentile = self.number(v, "percentile", 99.99, 0.0, 100.0 + 1e-9)
            data, listing = self.text(v, "data"), self.text(v, "list")  # a calibration dataset, an MLPerf-style list
            return CalibrationSpec(num, seed, v.get("method"), percentile, batch, data, listing)

    def tensorrt(self, value: Any) -> TrtOptions:
        if not isinstance(value, dict):
            raise self.error("tensorrt", f"expected a mapping (batch, workspace_mb, ...), got {value!r}")
        self.known(value, "tensorrt", {f.name for f in fields(TrtOptions)})
        v = dict(value)
        self.integer(v, "workspace_mb", 2048)
        if "cuda_graph" in v:
            self.flag(v, "cuda_graph")
        for k in ("timing_cache", "calibration_cache"):
            if v.get(k) is not None:
                self.text(v, k)
        if "batch" in v and not isinstance(v["batch"], (str, int)) or isinstance(v.get("batch"), bool):
            raise self.error("tensorrt.batch", f"expected N or 'MIN:OPT:MAX', got {v['batch']!r}")
        if isinstance(v.get("batch"), int):
            v["batch"] = str(v["batch"])
        try:
            return TrtOptions(**v)
        except ConfigError as exc:
            raise self.error("tensorrt", str(exc)) from None
