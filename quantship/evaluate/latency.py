"""Latency of a runner on a fixed, preloaded feed: warm-up, then timed calls of the runtime alone."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from quantship.runtime.base import Runner


def time_runner(
    runner: Runner,
    feed: dict[str, np.ndarray] | np.ndarray,
    warmup_calls: int = 5,
    warmup_seconds: float = 0.0,
    min_iters: int = 20,
    min_seconds: float = 0.0,
) -> tuple[np.ndarray, dict[str, list[float]]]:
    """Warm up (``warmup_calls`` calls, and until ``warmup_seconds`` have passed), then time at least
    ``min_iters`` calls over at least ``min_seconds``. Only the runtime call is timed
    (``runner.last_inference_time``).

    Returns:
        Per-call milliseconds, and the runner's per-phase times (``last_timings``: TensorRT's H2D /
        compute / D2H) when it has them.
    """
    end = time.perf_counter() + warmup_seconds
    for _ in range(warmup_calls):
        runner.infer(feed)
    while time.perf_counter() < end:
        runner.infer(feed)
    times: list[float] = []
    phases: dict[str, list[float]] = {}
    start = time.perf_counter()
    while len(times) < min_iters or time.perf_counter() - start < min_seconds:
        runner.infer(feed)
        times.append(runner.last_inference_time)
        for k, v in (getattr(runner, "last_timings", None) or {}).items():
            phases.setdefault(k, []).append(v)
    return np.asarray(times) * 1e3, phases


def measure_latency(
    runner: Runner,
    feed: dict[str, np.ndarray] | np.ndarray,
    warmup: int = 5,
    min_iters: int = 20,
    min_seconds: float = 0.0,
) -> dict[str, Any]:
    """:func:`time_runner` summarised: ``latency_ms_{min,mean,p50,p90,p95,p99,max}`` and ``iterations``."""
    ms, _ = time_runner(runner, feed, warmup, 0.0, min_iters, min_seconds)
    return latency_stats(ms)


def latency_stats(ms: np.ndarray) -> dict[str, Any]:
    """Summary statistics of per-call latencies in milliseconds (percentiles by linear interpolation)."""
    ms = np.asarray(ms, dtype=np.float64)
    return {
        "iterations": int(ms.size),
        "latency_ms_min": float(ms.min()),
        "latency_ms_mean": float(ms.mean()),
        "latency_ms_p50": float(np.percentile(ms, 50)),
        "latency_ms_p90": float(np.percentile(ms, 90)),
        "latency_ms_p95": float(np.percentile(ms, 95)),
        "latency_ms_p99": float(np.percentile(ms, 99)),
        "latency_ms_max": float(ms.max()),
    }
