"""Latency benchmarking of any artifact on its runtime (``quantship bench``).

Each configuration runs in a fresh process, so initialisation time and peak resident memory are its own (and
LoadGen's ``FromConfig`` applies MLPerf's rules, which it does only once per process). A query's latency is the
whole :meth:`Runner.infer` call on a preloaded input (``Runner.last_query_time``: the runner's own conversions
included), the runtime's call alone is reported beside it (``runtime_ms_*``). Plain timing: warm-up, then at
least ``min_queries`` queries and at least ``min_seconds`` seconds over a preloaded sample set (MLPerf
SingleStream's rule, scaled down). With ``loadgen`` set, MLPerf LoadGen issues and times the queries instead
(:mod:`quantship.evaluate.loadgen`), on the same sample set through the same ``infer`` call.
"""

from __future__ import annotations

import importlib.util
import os
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from quantship.errors import ConfigError, MissingDependencyError
from quantship.evaluate.latency import latency_stats, native_feed, sample_set, time_runner
from quantship.evaluate.loadgen import LoadgenSettings, Scenario, expected_from, run_loadgen
from quantship.evaluate.worker import run_worker, worker_main
from quantship.runtime.base import RunnerOptions
from quantship.runtime.registry import make_runner, runtime_for_artifact

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
            from quantship.evaluate.loadgen import Scenario

            Scenario.parse(self.loadgen)
            if importlib.util.find_spec("mlperf_loadgen") is None:
                raise MissingDependencyError(
                    "bench --loadgen needs MLPerf LoadGen: pip install 'quantship[loadgen]' (mlcommons-loadgen)"
                )


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
    """Benchmark in this process (the worker side of :func:`bench`)."""

    if cfg.cores:
        os.sched_setaffinity(0, set(cfg.cores))
    t0 = time.perf_counter()
    runtime = runtime_for_artifact(cfg.artifact)
    options = RunnerOptions(
        threads=cfg.threads, providers=cfg.providers, session_config=cfg.session_config, cuda_graph=cfg.cuda_graph
    )
    runner = make_runner(cfg.artifact, options, cfg.target or None)
    runner.activate()
    init_ms = (time.perf_counter() - t0) * 1e3
    row: dict[str, Any] = {
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
        "file_size_bytes": Path(cfg.artifact).stat().st_size,
        "init_ms": init_ms,
    }
    try:
        row["input_conversion_ms"] = _input_conversion_ms(runner, sample_set(runner, 1)[0])
        (_loadgen if cfg.loadgen else _plain)(runner, cfg, row)
    finally:
        runner.deactivate()
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    row["config"] = asdict(cfg)
    return row


def bench(configs: Sequence[BenchConfig], timeout: float | None = None) -> list[dict[str, Any]]:
    """Run each configuration in its own process; return one flat row per configuration."""
    rows = [
        run_worker("quantship.evaluate.bench", asdict(cfg), f"benchmark of {cfg.artifact}", timeout) for cfg in configs
    ]
    return annotate(rows)


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
            if other["latency_ms_p50"] < row["latency_ms_p50"]:
                row.setdefault("warnings", []).append(
                    f"int8 is slower than {other['target']} ({row['latency_ms_p50']:.2f} vs "
                    f"{other['latency_ms_p50']:.2f} ms p50)"
                )
    return rows


def display_fields(row: dict[str, Any]) -> dict[str, Any]:
    """Add what tables show of a bench row: size in MB, best throughput, warnings as one string."""
    row["size_mb"] = row.get("file_size_bytes", 0) / 1e6
    tp = [v for k, v in row.items() if k.startswith("throughput_ips_b")]
    row["throughput"] = max(tp) if tp else None
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


def _run_payload(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    for key in ("cores", "batch_sizes", "providers"):
        if cfg_dict.get(key) is not None:
            cfg_dict[key] = tuple(cfg_dict[key])
    return run_config(BenchConfig(**cfg_dict))


if __name__ == "__main__":
    worker_main(_run_payload)
