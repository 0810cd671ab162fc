"""Latency of a runner on preloaded feeds: warm-up, then timed queries.

A query's latency is the whole :meth:`Runner.infer` call (``Runner.last_query_time``): from handing the runner
a preloaded input until its outputs are back on the host, the runner's own conversions included (integer
(de)quantization, host-device copies). The runtime's call alone (``Runner.last_inference_time``: ``invoke``,
``session.run``, TensorRT's H2D + compute + D2H) is recorded beside it.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from quantship.runtime.base import Runner, quantize

Feed = Mapping[str, np.ndarray] | np.ndarray


@dataclass
class Timings:
    """Per-query times in milliseconds.

    Attributes:
        query_ms: Whole ``infer`` calls (the latency).
        runtime_ms: The runtime's call inside each of them.
        phases: The runner's per-phase times when it has them (TensorRT: ``h2d_ms``, ``compute_ms``,
            ``d2h_ms``), one list per phase.
    """

    query_ms: np.ndarray
    runtime_ms: np.ndarray
    phases: dict[str, list[float]] = field(default_factory=dict)


def _feeds(feed: Feed | Sequence[Feed]) -> list[Feed]:
    if isinstance(feed, (np.ndarray, Mapping)):
        return [feed]
    feeds = list(feed)
    if not feeds:
        raise ValueError("no feeds to time")
    return feeds


def time_runner(
    runner: Runner,
    feed: Feed | Sequence[Feed],
    warmup_calls: int = 5,
    warmup_seconds: float = 0.0,
    min_iters: int = 20,
    min_seconds: float = 0.0,
    raw: bool = False,
) -> Timings:
    """Warm up (``warmup_calls`` calls, and until ``warmup_seconds`` have passed), then time at least
    ``min_iters`` calls over at least ``min_seconds``.

    Args:
        feed: One feed, or a sequence of preloaded feeds used in turn (as LoadGen serves samples from its
            loaded set).
        raw: Passed to :meth:`Runner.infer` (feeds already in the model's own input types).
    """
    cycle = itertools.cycle(_feeds(feed))
    end = time.perf_counter() + warmup_seconds
    for _ in range(warmup_calls):
        runner.infer(next(cycle), raw=raw)
    while time.perf_counter() < end:
        runner.infer(next(cycle), raw=raw)
    query: list[float] = []
    runtime: list[float] = []
    phases: dict[str, list[float]] = {}
    start = time.perf_counter()
    while len(query) < min_iters or time.perf_counter() - start < min_seconds:
        runner.infer(next(cycle), raw=raw)
        query.append(runner.last_query_time)
        runtime.append(runner.last_inference_time)
        for k, v in (getattr(runner, "last_timings", None) or {}).items():
            phases.setdefault(k, []).append(v)
    return Timings(np.asarray(query) * 1e3, np.asarray(runtime) * 1e3, phases)


def measure_latency(
    runner: Runner,
    feed: Feed | Sequence[Feed],
    warmup: int = 5,
    min_iters: int = 20,
    min_seconds: float = 0.0,
) -> dict[str, Any]:
    """:func:`time_runner` summarised: ``latency_ms_*`` (whole queries), ``runtime_ms_*`` (the runtime's call)
    and ``iterations``."""
    t = time_runner(runner, feed, warmup, 0.0, min_iters, min_seconds)
    return {**latency_stats(t.query_ms), **latency_stats(t.runtime_ms, "runtime_ms")}


PERCENTILES = (50, 90, 95, 99)


def latency_stats(ms: np.ndarray, prefix: str = "latency_ms") -> dict[str, Any]:
    """Summary statistics of per-call times in milliseconds (percentiles by linear interpolation).

    ``prefix`` names the columns (``latency_ms_p50``, ``runtime_ms_p50``); ``iterations`` comes with the
    ``latency_ms`` prefix only.
    """
    ms = np.asarray(ms, dtype=np.float64)
    out: dict[str, Any] = {"iterations": int(ms.size)} if prefix == "latency_ms" else {}
    out[f"{prefix}_min"] = float(ms.min())
    out[f"{prefix}_mean"] = float(ms.mean())
    for p in PERCENTILES:
        out[f"{prefix}_p{p}"] = float(np.percentile(ms, p))
    out[f"{prefix}_max"] = float(ms.max())
    return out


def native_feed(runner: Runner, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``feed`` (float) converted once to each input's own type, as the runner would convert it per query:
    integer inputs quantized with their scale and zero point, others cast. Feed the result with ``raw=True``."""
    out = {}
    for m in runner.input_metadata():
        x = np.asarray(feed[m.name])
        out[m.name] = np.ascontiguousarray(quantize(x, m) if m.quantized else x.astype(m.dtype, copy=False))
    return out


def sample_set(runner: Runner, count: int, batch: int = 1, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """``count`` random float32 samples per input (uniform in [-1, 1]; dynamic dimensions other than the batch
    set to 1), grouped into feeds of ``batch`` samples; views of one contiguous array per input, made before
    any timing."""
    rng = np.random.default_rng(seed)
    n = max(count, batch)
    n -= n % batch
    arrays = {}
    for m in runner.input_metadata():
        shape = (n, *[d if d is not None else 1 for d in m.shape[1:]])
        arrays[m.name] = rng.uniform(-1, 1, shape).astype(np.float32)
    return [{k: v[i : i + batch] for k, v in arrays.items()} for i in range(0, n, batch)]
