"""Latency benchmarking of any artifact on its runtime (``quantship bench``).

Each configuration runs in a fresh process, so initialisation time and peak resident memory are its own.
Timing wraps only the runtime call (``Runner.infer`` on a preloaded, fixed input): warm-up first, then at
least ``min_queries`` queries and at least ``min_seconds`` seconds (MLPerf SingleStream's rule, scaled down).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from quantship.errors import ConfigError, RuntimeBackendError
from quantship.evaluate.latency import latency_stats, time_runner
from quantship.runtime.base import RunnerOptions
from quantship.runtime.registry import make_runner, runtime_for_artifact


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run.

    Attributes:
        artifact: Model file (.tflite, .onnx, .engine).
        target: Name in results (``tflite-int8``, ...).
        threads: CPU threads (LiteRT / ONNX Runtime); None: the runtime's default.
        cores: CPU cores to pin the process to (the mobile-class profile), or None.
        warmup_seconds: Warm-up before timing.
        min_queries, min_seconds: Timing runs until both are reached.
        batch_sizes: Batch sizes for the throughput figures (batch 1 gives the latency percentiles).
        cuda_graph: For TensorRT engines.
    """

    artifact: str
    target: str = ""
    threads: int | None = None
    cores: tuple[int, ...] | None = None
    warmup_seconds: float = 1.0
    min_queries: int = 200
    min_seconds: float = 5.0
    batch_sizes: tuple[int, ...] = (1,)
    cuda_graph: bool = False
    providers: tuple[str, ...] = ("cpu",)
    session_config: tuple[tuple[str, str], ...] = ()  # ONNX Runtime session entries the target runs with

    def __post_init__(self) -> None:
        object.__setattr__(self, "session_config", tuple(tuple(kv) for kv in self.session_config))
        runtime_for_artifact(self.artifact)  # a file no runtime runs: say so now, not in the worker
        if self.min_queries <= 0 or self.min_seconds < 0 or self.warmup_seconds < 0:
            raise ConfigError("min_queries must be positive, min_seconds and warmup_seconds not negative")
        if not self.batch_sizes or min(self.batch_sizes) <= 0:
            raise ConfigError("batch sizes must be positive")


def _feed(runner, batch: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feed = {}
    for m in runner.input_metadata():
        shape = (batch, *[d if d is not None else 1 for d in m.shape[1:]])
        feed[m.name] = rng.uniform(-1, 1, shape).astype(np.float32)
    return feed


def run_config(cfg: BenchConfig) -> dict[str, Any]:
    """Benchmark in this process (the worker side of :func:`bench`)."""
    import resource

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
        "threads": cfg.threads,
        "providers": runner.active_providers if runtime.name == "onnx" else None,
        "session_config": dict(cfg.session_config),
        "cores": list(cfg.cores) if cfg.cores else None,
        "file_size_bytes": Path(cfg.artifact).stat().st_size,
        "init_ms": init_ms,
    }
    try:
        for b in cfg.batch_sizes:
            ms, phases = time_runner(runner, _feed(runner, b), 1, cfg.warmup_seconds, cfg.min_queries, cfg.min_seconds)
            if b == 1 or "latency_ms_p50" not in row:
                row.update(latency_stats(ms))
                row["latency_batch"] = b
                for k, v in phases.items():
                    row[f"{k}_mean"] = float(np.mean(v))
            row[f"throughput_ips_b{b}"] = b * len(ms) / (ms.sum() / 1e3)
    finally:
        runner.deactivate()
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    row["config"] = asdict(cfg)
    return row


def bench(configs: Sequence[BenchConfig], timeout: float | None = None) -> list[dict[str, Any]]:
    """Run each configuration in its own process; return one flat row per configuration."""
    rows = []
    for cfg in configs:
        proc = subprocess.run(
            [sys.executable, "-m", "quantship.evaluate.bench"],
            input=json.dumps(asdict(cfg)),
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        )
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
            raise RuntimeBackendError(f"benchmark of {cfg.artifact} failed: {lines[-1] if lines else 'no output'}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return annotate(rows)


def annotate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add a warning to every int8 row that is slower than an fp16/fp32 sibling (same runtime and threads)."""

    def family(row):
        t = row["target"]
        return row["runtime"], row.get("threads"), tuple(row.get("cores") or ()), t.split("-")[0]

    for row in rows:
        if "int8" not in row["target"]:
            continue
        for other in rows:
            if other is row or family(other) != family(row) or not any(p in other["target"] for p in ("fp16", "fp32")):
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


def _worker() -> None:
    cfg_dict = json.loads(sys.stdin.read())
    for key in ("cores", "batch_sizes", "providers"):
        if cfg_dict.get(key) is not None:
            cfg_dict[key] = tuple(cfg_dict[key])
    print(json.dumps(run_config(BenchConfig(**cfg_dict))))


if __name__ == "__main__":
    _worker()
