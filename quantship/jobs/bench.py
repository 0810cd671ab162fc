"""``quantship bench``: build artifacts if asked, time each one in its own process (plainly or under MLPerf
LoadGen), time the Keras model's forward/backward passes if asked, write the rows."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from quantship.config import RemoteOptions
from quantship.errors import ConfigError, RemoteConnectionLost
from quantship.evaluate.bench import (
    DEFAULT_MIN_QUERIES,
    DEFAULT_MIN_SECONDS,
    BenchConfig,
    bench,
    display_fields,
    mobile_profile,
)
from quantship.evaluate.environment import environment
from quantship.evaluate.fbtime import FBConfig, backward_text, forward_backward
from quantship.evaluate.interleave import InterleaveOptions, matches_reference, stability_lines
from quantship.evaluate.loadgen import Scenario
from quantship.evaluate.report import BENCH_COLUMNS
from quantship.evaluate.results import text_table
from quantship.evaluate.stability import StopRule
from quantship.fileio import write_json_atomic, write_text_atomic
from quantship.jobs import JobResult
from quantship.jobs.convert import ConvertSpec, convert_artifacts
from quantship.models.loading import is_model_file
from quantship.models.registry import get_model_spec
from quantship.remote.bench import remote_bench
from quantship.remote.host import DeviceSession
from quantship.runtime.registry import get_runtime
from quantship.targets import get_target, list_targets, parse_targets

LOADGEN_COLUMNS = (
    ("target", "target", "{}"),
    ("loadgen_scenario", "scenario", "{}"),
    ("latency_ms_p50", "p50 ms", "{:.2f}"),
    ("latency_ms_p90", "p90 ms", "{:.2f}"),
    ("latency_ms_p99", "p99 ms", "{:.2f}"),
    ("runtime_ms_p50", "runtime p50 ms", "{:.2f}"),
    ("throughput", "samples/s", "{:.1f}"),
    ("loadgen_early_stopping_ms", "early-stopping ms", "{:.2f}"),
    ("loadgen_queries", "queries", "{}"),
    ("loadgen_samples", "samples", "{}"),
    ("validity", "validity", "{}"),
)
FB_COLUMNS = (
    ("model", "model", "{}"),
    ("batch", "batch", "{}"),
    ("device", "device", "{}"),
    ("forward_ms", "forward ms", "{:.2f}"),
    ("backward_display", "backward ms [95 % CI]", "{}"),
    ("total_ms", "total ms", "{:.2f}"),
    ("iterations", "iterations", "{}"),
)
LAYER_COLUMNS = (("layer", "layer", "{}"), ("type", "type", "{}"), ("forward_ms", "forward ms", "{:.3f}"))


def _check_fb_model(model: str) -> None:
    if is_model_file(model):
        return
    spec = get_model_spec(model)
    if spec.task != "classification":
        raise ConfigError(f"{model} is a {spec.task} model; --forward-backward takes classification models")


def _plan_line(
    n: int, scenarios: list, warmup_seconds: float, min_queries: int | None, min_seconds: float | None
) -> str:
    if scenarios:
        names = ", ".join(s.value for s in scenarios)
        if min_queries is None and min_seconds is None:
            return f"benchmarking {n} configuration(s) under MLPerf LoadGen ({names}): MLPerf's minimums (600 s each)"
        queries = min_queries if min_queries is not None else "MLPerf's"
        seconds = f"{min_seconds:g} s" if min_seconds is not None else "MLPerf's duration"
        return (
            f"benchmarking {n} configuration(s) under MLPerf LoadGen ({names}): minimums {queries} queries, {seconds}"
        )
    queries = min_queries if min_queries is not None else DEFAULT_MIN_QUERIES
    seconds = min_seconds if min_seconds is not None else DEFAULT_MIN_SECONDS
    return (
        f"benchmarking {n} configuration(s): warm-up {warmup_seconds:g} s, then >= {queries} queries and >= "
        f"{seconds:g} s each"
    )


def _configs(
    named: list[tuple[str, str]], out: Path, scenarios: list, mobile: bool, threads: int | None, common: dict
) -> list[BenchConfig]:
    """One configuration per artifact (per thread count with ``mobile``), under each LoadGen scenario if any."""

    known = {t.name for t in list_targets()}
    configs = []
    for name, path in named:
        variants = [dict(loadgen=s.value, loadgen_dir=str(out / "loadgen" / f"{name}-{s.value}")) for s in scenarios]
        # A target is timed with the session options it is evaluated with (Q/DQ targets: as fake-quant).
        session = get_target(name).session_config if name in known else ()
        for extra in variants or [{}]:
            if mobile and path.endswith(".tflite"):
                configs += mobile_profile(path, name, **common, **extra)
            else:
                configs.append(
                    BenchConfig(path, target=name, threads=threads, session_config=session, **common, **extra)
                )
    return configs


def _inference_lines(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    plain = [display_fields(dict(r)) for r in rows if r.get("harness") != "loadgen"]
    under_loadgen = [display_fields(dict(r)) for r in rows if r.get("harness") == "loadgen"]
    if plain:
        lines.append(text_table(plain, BENCH_COLUMNS))
    if under_loadgen:
        lines.append(text_table(under_loadgen, LOADGEN_COLUMNS))
    lines += stability_lines(plain)
    for r in rows:
        lines += [f"warning: {r['target']}: {w}" for w in r.get("warnings", [])]
        if r.get("delegate_partitions") is not None and r["delegated_nodes"] < r["total_nodes"]:
            lines.append(
                f"{r['target']}: LiteRT's delegate (XNNPACK) took {r['delegated_nodes']} of {r['total_nodes']} nodes "
                f"in {r['delegate_partitions']} partition(s); the rest run on LiteRT's builtin kernels"
            )
        if r.get("ort_kernels"):
            kernels = ", ".join(f"{k} {n}" for k, n in r["ort_kernels"].items())
            lines.append(f"{r['target']}: ONNX Runtime executes {kernels}")
        if r.get("compute_ms_mean") is not None:
            lines.append(
                f"{r['target']}: H2D {r['h2d_ms_mean']:.3f} ms, compute {r['compute_ms_mean']:.3f} ms, D2H "
                f"{r['d2h_ms_mean']:.3f} ms"
            )
        if r.get("input_conversion_ms") and r.get("inputs") == "float":
            lines.append(
                f"{r['target']}: the latency includes the runner's input quantization "
                f"({r['input_conversion_ms']:.3f} ms per query; --raw-inputs leaves it out)"
            )
        if r.get("loadgen_log_dir"):
            lines.append(f"{r['target']} ({r['loadgen_scenario']}): LoadGen logs in {r['loadgen_log_dir']}")
    return lines


def _forward_backward_rows(cfg: Any, out: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Time the Keras model's forward and forward+backward passes: the rows (written to ``forward_backward.jsonl``
    under ``out``) and their lines."""

    lines = [
        f"forward/backward of {cfg.model} (Keras, training mode): warm-up {cfg.warmup_seconds:g} s, then >= "
        f"{cfg.min_queries} iterations and >= {cfg.min_seconds:g} s at batch "
        f"{', '.join(map(str, cfg.batch_sizes))}"
    ]
    rows = forward_backward([cfg])
    lines.append(text_table([dict(r, backward_display=backward_text(r)) for r in rows], FB_COLUMNS))
    for r in rows:
        if not r["backward_resolved"]:
            lines.append(f"{r['model']}, batch {r['batch']}: backward not resolved: {r['backward_why']}")
        if r.get("slowest_layers"):
            lines.append(
                f"\n{r['model']}, batch {r['batch']}: the {len(r['slowest_layers'])} slowest layers' forward "
                f"times ({r['layers_timed']} layers timed alone, {r['layers_forward_ms_sum']:.2f} ms together)"
            )
            lines.append(text_table(r["slowest_layers"], LAYER_COLUMNS))
    _write_jsonl(out / "forward_backward.jsonl", rows)
    return rows, lines + [f"forward/backward: {out / 'forward_backward.jsonl'}"]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    write_text_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def _check_fb_options(model: str | None, forward_backward: bool, per_layer: bool) -> None:
    """Refuse --forward-backward without a model and --per-layer without --forward-backward."""
    if (forward_backward or per_layer) and not model:
        raise ConfigError("--forward-backward times a Keras model: give --model")
    if per_layer and not forward_backward:
        raise ConfigError("--per-layer goes with --forward-backward")


def _fb_config(spec: BenchSpec) -> Any:
    """The forward/backward timing of the spec's model (checked to be a classification model), with the weights and
    preprocessing overrides of its conversion."""

    convert = spec.convert
    if convert is None:  # _check_fb_options refused a run without a model first
        raise ConfigError("--forward-backward times a Keras model: give --model")
    _check_fb_model(convert.model)
    return FBConfig(
        convert.model,
        convert.weights,
        tuple(spec.batch_sizes),
        spec.warmup_seconds,
        spec.min_queries or DEFAULT_MIN_QUERIES,
        spec.min_seconds if spec.min_seconds is not None else DEFAULT_MIN_SECONDS,
        spec.per_layer,
        spec.threads,
        convert.preprocess_overrides or None,
    )


def _named_artifacts(spec: BenchSpec, session: Any = None) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """(name, path) of every artifact to time: the files given, then the targets of the spec's model built with
    its conversion; and the targets that failed to build."""
    named: list[tuple[str, str]] = [(Path(a).stem, str(a)) for a in spec.artifacts]
    failures: dict[str, str] = {}
    if spec.convert is not None and spec.convert.targets:
        convert = dataclasses.replace(spec.convert, out_dir=Path(spec.out), threads=spec.threads)
        built, failures = convert_artifacts(convert, session=session)
        named += [(name, str(a.path)) for name, a in built.items() if a is not None]
    return named, failures


def _inference_rows(
    named: list[tuple[str, str]],
    out: Path,
    scenarios: list,
    spec: BenchSpec,
    common: dict,
    interleave: Any = None,
    session: Any = None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Time every artifact in its own process (interleaved; or under each LoadGen scenario), on the device of
    ``session`` when given: the rows (written to ``bench.jsonl`` under ``out``) and their lines (``spec``: the
    cores, threads and model name of the rows).

    Raises:
        RemoteConnectionLost: The device went away; the rows measured before are written (``incomplete_run``).
    """
    configs = _configs(named, out, scenarios, spec.mobile, spec.threads, common)
    lines = []
    if configs:
        lines.append(
            _plan_line(len(configs), scenarios, common["warmup_seconds"], common["min_queries"], common["min_seconds"])
        )
    lost = None
    if session is not None and configs:
        env = session.environment
        lines.append(f"on {session.url}: {env.get('cpu')} ({env.get('machine')}, {env.get('cpu_count')} CPUs)")
        rows, lost = remote_bench(session, configs, interleave, lines)
    else:
        rows = bench(configs, interleave=interleave, lines=lines) if configs else []
    for r in rows:
        r["model"] = spec.model or ""
    if rows:
        _write_jsonl(out / "bench.jsonl", rows)
    if lost:
        kept = (
            f"; {len(rows)} row(s) measured so far are in {out / 'bench.jsonl'}, marked incomplete_run" if rows else ""
        )
        raise RemoteConnectionLost(f"{lost}{kept}")
    return rows, lines + _inference_lines(rows)


def _check_remote(spec: BenchSpec) -> None:
    """Refuse, before any work, what ``bench --remote`` cannot do on a device."""
    if spec.loadgen:
        raise ConfigError("--loadgen runs MLPerf LoadGen on this machine; with --remote, time without --loadgen")
    if spec.mobile:
        raise ConfigError("--mobile pins this machine's cores; with --remote, give --threads for the device")
    if spec.forward_backward:
        raise ConfigError("--forward-backward times Keras (TensorFlow) here; it does not run with --remote")
    if spec.convert is not None and spec.convert.targets:
        # A runtime without artifact files runs the model in memory (Keras: TensorFlow), which no device has.
        keras = [t.name for t in parse_targets(spec.convert.targets) if not get_runtime(t.spec.backend).suffixes]
        if keras:
            raise ConfigError(
                f"{', '.join(keras)} runs in TensorFlow, which the device runner does not have; bench --remote "
                "times .tflite, .onnx and .engine artifacts"
            )


def _interleave_options(
    stop: Any, queries_per_round: int, min_queries: int | None, min_seconds: float | None, reference: str | None
) -> Any:
    return InterleaveOptions(
        stop=stop,
        queries_per_round=queries_per_round,
        min_queries=min_queries if min_queries is not None else DEFAULT_MIN_QUERIES,
        min_seconds=min_seconds if min_seconds is not None else DEFAULT_MIN_SECONDS,
        reference=reference,
    )


def _check_reference_named(reference: str | None, artifacts: Sequence[str], targets: str | None) -> None:
    """Refuse a ``--reference`` that is neither an artifact given nor a target to build, before anything is built
    or timed (the interleaved run checks again against what was built)."""
    if reference is None:
        return

    names = [t.strip() for t in (targets or "").split(",") if t.strip()]
    if any(matches_reference(reference, Path(a).stem, str(a)) for a in artifacts) or reference in names:
        return
    given = ", ".join([Path(a).stem for a in artifacts] + names) or "nothing"
    raise ConfigError(f"--reference {reference} is none of the configurations to bench ({given}): name one of them")


@dataclass
class BenchSpec:
    """Everything ``quantship bench`` needs.

    Attributes:
        artifacts: Artifact files to time.
        convert: The model whose targets are built first and timed (no targets: none built; its model is what
            ``forward_backward`` times).
        min_queries, min_seconds: None: 200 queries and 5 s for plain timing, MLPerf's minimums under LoadGen.
        loadgen: LoadGen scenarios; each artifact runs once under each of them instead of plain timing.
        raw_inputs: Samples preloaded in the model's own input types, the runner run raw.
        forward_backward: Also time the model's forward and forward+backward passes (Keras, training mode) at
            each batch size; ``per_layer`` adds the ten slowest layers' forward times.
        reference: Target name or artifact file every ratio is taken to (None: the first fp32 configuration of
            the same runtime, else the first).
        ratio_precision, min_rounds, max_seconds: The interleaved run's stopping rule
            (:class:`~quantship.evaluate.stability.StopRule`; refused before anything is built or timed).
        queries_per_round: Queries per configuration per round.
        remote: Time on this device instead (each configuration in its own runner process there).
    """

    out: Path
    artifacts: Sequence[str] = ()
    convert: ConvertSpec | None = None
    threads: int | None = None
    mobile: bool = False
    batch_sizes: Sequence[int] = (1,)
    warmup_seconds: float = 1.0
    min_queries: int | None = None
    min_seconds: float | None = None
    cuda_graph: bool = False
    providers: Sequence[str] = ("cpu",)
    loadgen: Sequence[str] = ()
    raw_inputs: bool = False
    forward_backward: bool = False
    per_layer: bool = False
    reference: str | None = None
    ratio_precision: float = 0.03
    min_rounds: int = 10
    max_seconds: float = 60.0
    queries_per_round: int = 20
    remote: RemoteOptions | None = None

    @property
    def model(self) -> str | None:
        return self.convert.model if self.convert is not None else None


def run_bench(spec: BenchSpec) -> JobResult:
    """Benchmark artifact files, and the artifacts of the spec's model built first (:class:`BenchSpec`)."""

    stop = StopRule(ratio_precision=spec.ratio_precision, min_rounds=spec.min_rounds, max_seconds=spec.max_seconds)
    scenarios = [Scenario.parse(s) for s in spec.loadgen]
    _check_fb_options(spec.model, spec.forward_backward, spec.per_layer)
    fb_config = _fb_config(spec) if spec.forward_backward else None
    targets = spec.convert.targets if spec.convert is not None else None
    _check_reference_named(
        spec.reference, spec.artifacts, ",".join(targets) if isinstance(targets, (list, tuple)) else targets
    )
    session = None
    if spec.remote is not None:
        _check_remote(spec)
        session = DeviceSession(spec.remote)  # a malformed URL is refused here
    # An unreachable or unfit device is reported before anything is converted.
    with session or contextlib.nullcontext():
        return _bench_body(spec, scenarios, stop, fb_config, session)


def _bench_body(spec: BenchSpec, scenarios: list, stop: Any, fb_config: Any, session: Any) -> JobResult:
    """:func:`run_bench` once its options are checked (and its device session, if any, open)."""
    named, failures = _named_artifacts(spec, session)
    if not named and fb_config is None:
        raise ConfigError("nothing to benchmark: give --artifact FILE (repeatable) or --model with --targets")
    out = Path(spec.out)
    common = dict(
        warmup_seconds=spec.warmup_seconds,
        min_queries=spec.min_queries,
        min_seconds=spec.min_seconds,
        batch_sizes=tuple(spec.batch_sizes),
        cuda_graph=spec.cuda_graph,
        raw_inputs=spec.raw_inputs,
        providers=tuple(spec.providers),
    )
    interleave = _interleave_options(stop, spec.queries_per_round, spec.min_queries, spec.min_seconds, spec.reference)
    rows, lines = _inference_rows(named, out, scenarios, spec, common, interleave, session)
    fb_rows: list[dict[str, Any]] = []
    if fb_config is not None:
        fb_rows, fb_lines = _forward_backward_rows(fb_config, out)
        lines += fb_lines
    env = environment()
    if session is not None:
        env["remote"] = session.fields()
    write_json_atomic(out / "environment.json", env)
    lines += [f"FAILED {name}: {error}" for name, error in failures.items()]
    if rows:
        lines.append(f"results: {out / 'bench.jsonl'}")
    return JobResult(rows + fb_rows, lines, 1 if failures else 0)
