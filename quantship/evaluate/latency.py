"""Latency of a runner on a fixed, preloaded feed: warm-up, then timed calls of the runtime alone."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from quantship.runtime.base import Runner


def measure_latency(
    runner: Runner, feed: dict[str, np.ndarray] | np.ndarray, warmup: int = 5, min_iters: int = 20, min_seconds: float = 0.0
) -> dict[str, Any]:
    """Time ``runner.infer(feed)`` after ``warmup`` calls, for at least ``min_iters`` calls and
    ``min_seconds`` seconds. Only the runtime call is timed (``runner.last_inference_time``).

    Returns:
        ``latency_ms_{min,mean,p50,p90,p95,p99,max}`` and ``iterations``.
    """
    for _ in range(warmup):
        runner.infer(feed)
    times = []
    start = time.perf_counter()
    while len(times) < min_iters or time.perf_counter() - start < min_seconds:
        runner.infer(feed)
        times.append(runner.last_inference_time)
    return latency_stats(np.asarray(times) * 1e3)


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
