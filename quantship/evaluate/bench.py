"""Latency benchmarking of any artifact on its runtime (``quantship bench``).

Each configuration runs in its own process, so initialisation time and peak resident memory are its own (and
LoadGen's ``FromConfig`` applies MLPerf's rules, which it does only once per process). A query's latency is the
whole :meth:`Runner.infer` call on a preloaded input (``Runner.last_query_time``: the runner's own conversions
included), the runtime's call alone is reported beside it (``runtime_ms_*``).

Plain timing is interleaved (:mod:`quantship.evaluate.interleave`): every configuration's process
(:class:`LocalBenchWorker`, driving a :class:`ConfigSession` on its side) stays alive, warms up, then runs a fixed
number of queries per round, the order rotated each round, until the minimums (queries and seconds per
configuration, MLPerf SingleStream's rule scaled down) are met and every ratio to the reference is as precise
as asked, or the time is up. With ``loadgen`` set, MLPerf LoadGen issues and times the queries instead
(:mod:`quantship.evaluate.loadgen`), one fresh process per configuration, on the same sample set through the same
``infer`` call.
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import select
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from quantship import errors
from quantship.errors import ConfigError, MissingDependencyError, QuantshipError
from quantship.evaluate.interleave import InterleaveOptions, check_reference, run_interleaved, stability_lines
from quantship.evaluate.latency import latency_stats, native_feed, sample_set, time_runner
from quantship.evaluate.loadgen import LoadgenSettings, Scenario, expected_from, run_loadgen
from quantship.evaluate.stability import StopRule, machine_state, settle_threads
from quantship.evaluate.worker import run_worker, worker_main
from quantship.runtime.base import RunnerOptions
from quantship.runtime.registry import make_runner, runtime_for_artifact

if TYPE_CHECKING:
    from quantship.evaluate.interleave import InterleaveOptions

DEFAULT_MIN_QUERIES = 200
DEFAULT_MIN_SECONDS = 5.0


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run.

    Attributes:
        artifact: Model file (.tflite, .onnx, .engine).
        target: Name in results (``tflite-int8``, ...).
        threads: CPU threads (LiteRT / ONNX Runtime); None: the runtime's default.
        cores: CPU cores to pin the process to (the mobile-class profile), or None.
        warmup_seconds: Warm-up before timing.
        min_queries, min_seconds: Timing runs until both are reached. None: 200 queries and 5 s for plain
            timing, MLPerf's minimums under LoadGen (lower values make a LoadGen run valid only under reduced
            settings).
        batch_sizes: Batch sizes for the throughput figures (batch 1 gives the latency percentiles); under
            LoadGen Offline, the largest is the batch the SUT runs.
        cuda_graph: For TensorRT engines.
        loadgen: LoadGen scenario (``singlestream``, ``multistream``, ``offline``), or None for plain timing.
        loadgen_dir: LoadGen's log folder.
        samples: Size of the preloaded sample set the queries cycle through (LoadGen's performance sample
            count).
        raw_inputs: Preload the samples in the model's own input types (integer inputs quantized once, as an
            MLPerf QSL holds them) and run the runner raw: no (de)quantization in the timed call. By default
            samples are float32 and the runner converts them in every query, as it does for an application.
    """

    artifact: str
    target: str = ""
    threads: int | None = None
    cores: tuple[int, ...] | None = None
    warmup_seconds: float = 1.0
    min_queries: int | None = None
    min_seconds: float | None = None
    batch_sizes: tuple[int, ...] = (1,)
    cuda_graph: bool = False
    providers: tuple[str, ...] = ("cpu",)
    loadgen: str | None = None
    loadgen_dir: str | None = None
    samples: int = 64
    raw_inputs: bool = False
    session_config: tuple[tuple[str, str], ...] = ()  # ONNX Runtime session entries the target runs with

    def __post_init__(self) -> None:
        object.__setattr__(self, "session_config", tuple(tuple(kv) for kv in self.session_config))
        runtime_for_artifact(self.artifact)  # a file no runtime runs: say so now, not in the worker
        if (self.min_queries is not None and self.min_queries <= 0) or self.warmup_seconds < 0:
            raise ConfigError("min_queries must be positive, min_seconds and warmup_seconds not negative")
        if self.min_seconds is not None and self.min_seconds < 0:
            raise ConfigError("min_queries must be positive, min_seconds and warmup_seconds not negative")
        if not self.batch_sizes or min(self.batch_sizes) <= 0:
            raise ConfigError("batch sizes must be positive")
        if self.samples <= 0:
            raise ConfigError("the sample set must hold at least one sample")
        if self.loadgen is not None:
            Scenario.parse(self.loadgen)
            if importlib.util.find_spec("mlperf_loadgen") is None:
                raise MissingDependencyError(
                    "bench --loadgen needs MLPerf LoadGen: pip install 'quantship[loadgen]' (mlcommons-loadgen)"
                )


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB, its own only.

    ``VmHWM`` of ``/proc/self/status``: the high-water mark of the address space this process has had since its
    ``exec``. ``getrusage(RUSAGE_SELF).ru_maxrss`` is not: Linux carries the parent's peak over ``fork``/``vfork``
    + ``exec`` (the old address space's high-water mark is kept in the signal struct), so a worker started by a
    ``quantship bench --model`` process that had TensorFlow loaded for the conversion reported that process's
    1.1 GB for a model that takes 175 MB on its own. ``ru_maxrss`` remains the fallback where /proc is missing.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _input_conversion_ms(runner, feed: dict[str, np.ndarray], repeats: int = 20) -> float | None:
    """Median time of converting one float feed to the model's integer inputs, or None for float inputs."""
    if not any(m.quantized for m in runner.input_metadata()):
        return None
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        native_feed(runner, feed)
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e3


def _feeds(runner, cfg: BenchConfig, batch: int) -> list[dict[str, np.ndarray]]:
    feeds = sample_set(runner, cfg.samples, batch)
    return [native_feed(runner, f) for f in feeds] if cfg.raw_inputs else feeds


def _plain(runner, cfg: BenchConfig, row: dict[str, Any]) -> None:
    min_queries = cfg.min_queries if cfg.min_queries is not None else DEFAULT_MIN_QUERIES
    min_seconds = cfg.min_seconds if cfg.min_seconds is not None else DEFAULT_MIN_SECONDS
    for b in cfg.batch_sizes:
        t = time_runner(runner, _feeds(runner, cfg, b), 1, cfg.warmup_seconds, min_queries, min_seconds, cfg.raw_inputs)
        if b == 1 or "latency_ms_p50" not in row:
            row.update(latency_stats(t.query_ms))
            row.update(latency_stats(t.runtime_ms, "runtime_ms"))
            row["latency_batch"] = b
            for k, v in t.phases.items():
                row[f"{k}_mean"] = float(np.mean(v))
        row[f"throughput_ips_b{b}"] = b * len(t.query_ms) / (t.query_ms.sum() / 1e3)


def _loadgen(runner, cfg: BenchConfig, row: dict[str, Any]) -> None:
    scenario = Scenario.parse(cfg.loadgen)
    per_query = {Scenario.SINGLESTREAM: 1, Scenario.MULTISTREAM: 8, Scenario.OFFLINE: max(cfg.batch_sizes)}[scenario]
    # Warm-up doubles as the measurement LoadGen's schedule is generated from.
    warm = time_runner(runner, _feeds(runner, cfg, per_query), 3, cfg.warmup_seconds, 10, 0.0, cfg.raw_inputs)
    latency_ms, qps = expected_from(warm.query_ms, per_query)
    settings = LoadgenSettings(
        scenario,
        min_queries=cfg.min_queries,
        min_seconds=cfg.min_seconds,
        samples_per_query=8 if scenario is Scenario.MULTISTREAM else None,
        batch=per_query,
        expected_latency_ms=latency_ms,
        expected_qps=qps,
    )
    folder = cfg.loadgen_dir or f"loadgen-{Path(cfg.artifact).stem}-{scenario.value}"
    row.update(run_loadgen(runner, _feeds(runner, cfg, 1), settings, folder, raw=cfg.raw_inputs))
    if scenario is not Scenario.OFFLINE:
        row["latency_batch"] = per_query


def run_config(cfg: BenchConfig) -> dict[str, Any]:
    """Benchmark in this process (the worker side of :func:`bench` under LoadGen)."""

    if cfg.cores:
        os.sched_setaffinity(0, set(cfg.cores))
    t0 = time.perf_counter()
    runtime = runtime_for_artifact(cfg.artifact)
    options = RunnerOptions(
        threads=cfg.threads, providers=cfg.providers, session_config=cfg.session_config, cuda_graph=cfg.cuda_graph
    )
    runner = make_runner(cfg.artifact, options, cfg.target or None)
    runner.activate()
    row = _base_row(cfg, runner, runtime, (time.perf_counter() - t0) * 1e3)
    try:
        row["input_conversion_ms"] = _input_conversion_ms(runner, sample_set(runner, 1)[0])
        (_loadgen if cfg.loadgen else _plain)(runner, cfg, row)
    finally:
        runner.deactivate()
    row["peak_rss_mb"] = peak_rss_mb()
    row["config"] = asdict(cfg)
    return row


def _base_row(cfg: BenchConfig, runner, runtime, init_ms: float) -> dict[str, Any]:
    return {
        "target": cfg.target or Path(cfg.artifact).stem,
        "artifact": str(cfg.artifact),
        "runtime": runtime.name,
        "timing": runtime.timing,
        "harness": "bench",
        "inputs": "raw" if cfg.raw_inputs else "float",
        "threads": cfg.threads,
        "providers": runner.active_providers,
        "session_config": dict(cfg.session_config),
        "cores": list(cfg.cores) if cfg.cores else None,
        "cores_in_use": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "file_size_bytes": Path(cfg.artifact).stat().st_size,
        "init_ms": init_ms,
        "where": "local",
    }


def latency_batch(cfg: BenchConfig) -> int:
    """The batch the latency percentiles are timed at: 1 when asked for, else the first batch size."""
    return 1 if 1 in cfg.batch_sizes else cfg.batch_sizes[0]


def settle_fields(waited_ms: Sequence[float], settled: Sequence[bool]) -> dict[str, Any]:
    """A row's record of the waits after its rounds (:func:`~quantship.evaluate.stability.settle_threads`):
    ``settle_ms_p50`` and ``unsettled_rounds``, the rounds after which its threads still used the CPU at the
    limit (the next configuration's round may have shared the cores with them)."""
    if not waited_ms:
        return {}
    return {"settle_ms_p50": float(np.median(waited_ms)), "unsettled_rounds": int(sum(not ok for ok in settled))}


class ConfigSession:
    """One configuration in this process, driven round by round (the worker side of :class:`LocalBenchWorker`;
    a device runner does the same on its side).

    ``start`` loads and allocates (``init_ms``), times the first inference on its own (``first_inference_ms``:
    lazy allocation, kernel packing and delegate preparation happen there) and warms up; ``round`` times queries
    at the latency batch over the preloaded sample set; ``finish`` reads what only this process knows.
    """

    def __init__(self, cfg: BenchConfig):
        self.cfg = cfg
        self.runner = None
        self._feeds: list[dict[str, np.ndarray]] = []
        self._next = 0
        self._runtime_ms: list[float] = []
        self._phases: dict[str, list[float]] = {}
        self._settles: list[tuple[float, bool]] = []

    def start(self) -> dict[str, Any]:
        cfg = self.cfg
        if cfg.cores:
            os.sched_setaffinity(0, set(cfg.cores))
        before = machine_state(cfg.cores)
        t0 = time.perf_counter()
        runtime = runtime_for_artifact(cfg.artifact)
        options = RunnerOptions(
            threads=cfg.threads, providers=cfg.providers, session_config=cfg.session_config, cuda_graph=cfg.cuda_graph
        )
        self.runner = runner = make_runner(cfg.artifact, options, cfg.target or None)
        runner.activate()
        row = _base_row(cfg, runner, runtime, (time.perf_counter() - t0) * 1e3)
        batch = latency_batch(cfg)
        self._feeds = _feeds(runner, cfg, batch)
        runner.infer(self._feeds[0], raw=cfg.raw_inputs)
        row["first_inference_ms"] = runner.last_query_time * 1e3
        end = time.perf_counter() + cfg.warmup_seconds
        warmup = 0
        while warmup < 5 or time.perf_counter() < end:
            runner.infer(self._next_feed(), raw=cfg.raw_inputs)
            warmup += 1
        row["warmup_queries"] = warmup
        row["latency_batch"] = batch
        row["input_conversion_ms"] = _input_conversion_ms(runner, sample_set(runner, 1)[0])
        row["load_average_before"] = before["load_average"]
        row["cpu_mhz_before"] = before["cpu_mhz"]
        return row

    def _next_feed(self) -> dict[str, np.ndarray]:
        feed = self._feeds[self._next % len(self._feeds)]
        self._next += 1
        return feed

    def round(self, queries: int) -> list[float]:
        runner, raw = self.runner, self.cfg.raw_inputs
        out = []
        for _ in range(int(queries)):
            runner.infer(self._next_feed(), raw=raw)
            out.append(runner.last_query_time * 1e3)
            self._runtime_ms.append(runner.last_inference_time * 1e3)
            for k, v in (getattr(runner, "last_timings", None) or {}).items():
                self._phases.setdefault(k, []).append(v)
        # The next configuration's round starts when this answer arrives: with this one's threads idle.
        self._settles.append(settle_threads())
        return out

    def finish(self) -> dict[str, Any]:
        cfg, runner = self.cfg, self.runner
        after = machine_state(cfg.cores)
        row: dict[str, Any] = {"load_average_after": after["load_average"], "cpu_mhz_after": after["cpu_mhz"]}
        row.update(settle_fields([s * 1e3 for s, _ in self._settles], [ok for _, ok in self._settles]))
        if self._runtime_ms:
            row.update(latency_stats(np.asarray(self._runtime_ms), "runtime_ms"))
        for k, v in self._phases.items():
            row[f"{k}_mean"] = float(np.mean(v))
        # Throughput at the other batch sizes: plain timing, after the interleaved rounds (an absolute figure).
        for b in cfg.batch_sizes:
            if b == latency_batch(cfg):
                continue
            min_queries = cfg.min_queries if cfg.min_queries is not None else DEFAULT_MIN_QUERIES
            min_seconds = cfg.min_seconds if cfg.min_seconds is not None else DEFAULT_MIN_SECONDS
            t = time_runner(
                runner, _feeds(runner, cfg, b), 1, cfg.warmup_seconds, min_queries, min_seconds, cfg.raw_inputs
            )
            row[f"throughput_ips_b{b}"] = b * len(t.query_ms) / (t.query_ms.sum() / 1e3)
        row["peak_rss_mb"] = peak_rss_mb()  # before the profiled session below adds its own memory
        row.update(runner.execution_details(sample_set(runner, 1)[0]))
        row["config"] = asdict(cfg)
        return row

    def close(self) -> None:
        if self.runner is not None:
            self.runner.deactivate()
            self.runner = None


class LocalBenchWorker:
    """A :class:`~quantship.evaluate.interleave.BenchWorker` in its own local process
    (``python -m quantship.evaluate.bench --serve``), so its init time, peak memory and thread pools are its own.

    The two processes talk in JSON lines: the host writes ``{"op": "start", "config": {BenchConfig fields}}``,
    ``{"op": "round", "queries": N}``, ``{"op": "finish"}``, ``{"op": "close"}``; the worker answers each but
    ``close`` with one line, ``{"ok": <start's row | list of ms | finish's row>}`` or
    ``{"_error": message, "_type": QuantshipError subclass name}``.

    Args:
        cfg: The configuration.
        timeout: Seconds any one answer may take (None: no limit).
    """

    def __init__(self, cfg: BenchConfig, timeout: float | None = None):
        self.cfg = cfg
        self.target = cfg.target or Path(cfg.artifact).stem
        self.artifact = str(cfg.artifact)
        self.timeout = timeout
        self._proc = None
        self._stderr = None

    def _spawn(self) -> None:
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "quantship.evaluate.bench", "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            bufsize=1,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        )

    def _ask(self, message: dict[str, Any]) -> Any:
        what = f"benchmark of {self.artifact}"
        proc = self._proc
        try:
            proc.stdin.write(json.dumps(message) + "\n")
            proc.stdin.flush()
            if self.timeout is not None and not select.select([proc.stdout], [], [], self.timeout)[0]:
                raise errors.RuntimeBackendError(f"{what}: no answer to '{message['op']}' in {self.timeout:g} s")
            line = proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            proc.wait(timeout=10)
            self._stderr.seek(0)
            err = [ln for ln in self._stderr.read().splitlines() if ln.strip()]
            raise errors.RuntimeBackendError(f"{what} failed: {err[-1] if err else 'the worker ended'}")
        answer = json.loads(line)
        if "_error" in answer:
            kind = getattr(errors, answer.get("_type", ""), None)
            if not (isinstance(kind, type) and issubclass(kind, errors.QuantshipError)):
                kind = errors.RuntimeBackendError
            raise kind(answer["_error"])
        return answer["ok"]

    def start(self) -> dict[str, Any]:
        self._spawn()
        return self._ask({"op": "start", "config": asdict(self.cfg)})

    def round(self, queries: int) -> list[float]:
        return self._ask({"op": "round", "queries": int(queries)})

    def finish(self) -> dict[str, Any]:
        return self._ask({"op": "finish"})

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return

        try:
            if proc.poll() is None:
                proc.stdin.write(json.dumps({"op": "close"}) + "\n")
                proc.stdin.flush()
            proc.stdin.close()
            proc.wait(timeout=10)
        except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        finally:
            proc.stdout.close()
            if self._stderr is not None:
                self._stderr.close()
                self._stderr = None


def serve() -> None:
    """The worker side of :class:`LocalBenchWorker`: answer JSON-line requests on stdin until ``close`` or EOF.

    Native libraries may write to stdout from C: fd 1 points at stderr while the worker runs and answers go to
    the original stdout.
    """

    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    session: ConfigSession | None = None
    try:
        for line in sys.stdin:
            message = json.loads(line)
            op = message.get("op")
            if op == "close":
                break
            try:
                if op == "start":
                    session = ConfigSession(_config_from(message["config"]))
                    result: Any = session.start()
                elif op == "round" and session is not None:
                    result = session.round(message["queries"])
                elif op == "finish" and session is not None:
                    result = session.finish()
                else:
                    raise ConfigError(f"bench worker: unexpected request {op!r}")
                answer = {"ok": result}
            except QuantshipError as exc:
                answer = {"_error": str(exc), "_type": type(exc).__name__}
            sys.stdout.flush()
            answers.write(json.dumps(answer) + "\n")
    finally:
        if session is not None:
            session.close()
        answers.close()


def bench(
    configs: Sequence[BenchConfig],
    timeout: float | None = None,
    interleave: "InterleaveOptions | None" = None,
    lines: list[str] | None = None,
    make_worker: Any = None,
) -> list[dict[str, Any]]:
    """Time every configuration in its own process and return one flat row per configuration, in order.

    Plain-timed configurations run interleaved (:func:`quantship.evaluate.interleave.run_interleaved`): one
    persistent worker process each, driven round by round with the order rotated, each row with its ratio to a
    reference. Configurations under LoadGen run one after another, each in a fresh process (LoadGen times them).

    Args:
        interleave: Rounds, stopping rule and reference (None: defaults, with the minimum queries and seconds
            taken from the configurations).
        lines: Receives the interleaved run's summary line.
        make_worker: ``make_worker(cfg) -> BenchWorker`` (``bench --remote``: a runner on the device); default
            :class:`LocalBenchWorker`.
    """

    rows: list[dict[str, Any] | None] = [None] * len(configs)
    plain = [i for i, c in enumerate(configs) if not c.loadgen]
    if plain:
        options = interleave or InterleaveOptions(
            min_queries=max(c.min_queries or DEFAULT_MIN_QUERIES for c in (configs[i] for i in plain)),
            min_seconds=max(
                c.min_seconds if c.min_seconds is not None else DEFAULT_MIN_SECONDS for c in (configs[i] for i in plain)
            ),
        )
        workers = [make_worker(configs[i]) if make_worker else LocalBenchWorker(configs[i], timeout) for i in plain]
        check_reference(options.reference, workers)
        try:
            run = run_interleaved(workers, options)
        finally:
            for w in workers:
                w.close()
        for i, row in zip(plain, run.rows):
            rows[i] = row
        if lines is not None:
            lines.append(run.summary(options))
    for i, cfg in enumerate(configs):
        if cfg.loadgen:
            rows[i] = run_worker("quantship.evaluate.bench", asdict(cfg), f"benchmark of {cfg.artifact}", timeout)
    done = [r for r in rows if r is not None]
    for r in done:
        r["throughput_batch"] = throughput_batch(r)
    return annotate(done)


# Bench pass of another job (demo, sign-off): shorter than a `bench` run's defaults, same method.
PASS_OPTIONS = dict(queries_per_round=10, min_queries=100, min_seconds=1.0)


def latency_pass(
    files: Sequence[tuple[str, str, Sequence[tuple[str, str]]]],
    threads: int | None,
    stop: StopRule = StopRule(),
    lines: list[str] | None = None,
    queries_per_round: int = PASS_OPTIONS["queries_per_round"],
    reference: str | None = None,
    make_worker: Any = None,
) -> dict[str, dict[str, Any]]:
    """Interleaved batch-1 latency of artifact files for another job's table: ``{target: bench row}``.

    Args:
        files: ``(target, artifact path, session config)`` of each configuration.
        threads: CPU threads of each (None: the runtime's default).
        stop: When the rounds stop (precision of the ratios, minimum rounds, time limit).
        lines: Receives the run's summary and its stability warnings.
        make_worker: As :func:`bench`'s (a sign-off plan's ``remote:`` device).
    """
    if not files:
        return {}
    configs = [
        BenchConfig(path, target=name, threads=threads, session_config=tuple(session), warmup_seconds=0.5)
        for name, path, session in files
    ]
    options = InterleaveOptions(
        stop=stop,
        queries_per_round=queries_per_round,
        min_queries=PASS_OPTIONS["min_queries"],
        min_seconds=PASS_OPTIONS["min_seconds"],
        reference=reference,
    )
    rows = bench(configs, interleave=options, lines=lines, make_worker=make_worker)
    if lines is not None:
        lines += stability_lines(rows)
    return {r["target"]: r for r in rows}


def annotate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add a warning to every int8 row that is slower than an fp16/fp32 sibling (same runtime and threads)."""

    def family(row):
        t = row["target"]
        return (
            row["runtime"],
            row.get("threads"),
            tuple(row.get("cores") or ()),
            t.split("-")[0],
            row.get("harness"),
            row.get("loadgen_scenario"),
            row.get("inputs"),
        )

    for row in rows:
        if "int8" not in row["target"] or row.get("latency_ms_p50") is None:
            continue
        for other in rows:
            if other is row or family(other) != family(row) or not any(p in other["target"] for p in ("fp16", "fp32")):
                continue
            if other.get("latency_ms_p50") is None:
                continue
            if row.get("reference") == other["target"] and row.get("ratio_ci_low") is not None:
                # Interleaved with it: judged by the ratio's interval, not by two absolute p50s.
                if row["ratio_ci_low"] > 1:
                    row.setdefault("warnings", []).append(
                        f"int8 is slower than {other['target']} ({row['ratio_to_reference']:.2f}x, 95 % interval "
                        f"{row['ratio_ci_low']:.2f}-{row['ratio_ci_high']:.2f}, timed interleaved)"
                    )
                continue
            if other["latency_ms_p50"] < row["latency_ms_p50"]:
                row.setdefault("warnings", []).append(
                    f"int8 is slower than {other['target']} ({row['latency_ms_p50']:.2f} vs "
                    f"{other['latency_ms_p50']:.2f} ms p50)"
                )
    return rows


def throughput_batch(row: dict[str, Any]) -> int | None:
    """The batch size of the row's best throughput (the one the console's throughput column shows)."""
    tp = {int(k[len("throughput_ips_b") :]): v for k, v in row.items() if k.startswith("throughput_ips_b")}
    return max(tp, key=lambda b: tp[b]) if tp else None


def display_fields(row: dict[str, Any]) -> dict[str, Any]:
    """Add what tables show of a bench row: size in MB, best throughput and its batch, the ratio to the reference
    with its interval, stability, warnings as one string."""
    row["size_mb"] = row.get("file_size_bytes", 0) / 1e6
    b = row.get("throughput_batch") or throughput_batch(row)
    row["throughput"] = row.get(f"throughput_ips_b{b}") if b else None
    row["throughput_batch"] = b
    if row.get("ratio_to_reference") is not None:
        if row.get("reference") == row.get("target"):
            row["ratio_display"] = "reference"
        else:
            row["ratio_display"] = (
                f"{row['ratio_to_reference']:.3f}x [{row['ratio_ci_low']:.3f}, {row['ratio_ci_high']:.3f}] "
                f"of {row['reference']}"
            )
    if "stable" in row:
        row["stable_display"] = "yes" if row["stable"] else "NO"
    if row.get("total_nodes") is not None:
        row["execution"] = f"{row['delegated_nodes']}/{row['total_nodes']} nodes delegated"
    elif row.get("ort_kernels") is not None:
        row["execution"] = f"{row.get('ort_int8_kernels', 0)}/{sum(row['ort_kernels'].values())} int8 kernels"
    row["warning"] = "; ".join(row.get("warnings", []))
    return row


def mobile_profile(
    artifact: str | Path, target: str = "", thread_counts: Sequence[int] = (1, 2, 4), **kw: Any
) -> list[BenchConfig]:
    """LiteRT on 1, 2 and 4 threads, each pinned to that many fixed cores (0..n-1) like a phone's big cores.

    On a machine with fewer cores than asked, the threads share the cores there are (noted in the row).
    """
    available = sorted(os.sched_getaffinity(0))
    out = []
    for n in thread_counts:
        cores = tuple(available[: min(n, len(available))])
        out.append(
            BenchConfig(str(artifact), target=f"{target or Path(artifact).stem}@{n}t", threads=n, cores=cores, **kw)
        )
    return out


def _config_from(cfg_dict: dict[str, Any]) -> BenchConfig:
    for key in ("cores", "batch_sizes", "providers"):
        if cfg_dict.get(key) is not None:
            cfg_dict[key] = tuple(cfg_dict[key])
    return BenchConfig(**cfg_dict)


def _run_payload(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    return run_config(_config_from(cfg_dict))


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--serve"]:
        serve()
    else:
        worker_main(_run_payload)
