"""Interleaved latency runs: every configuration timed in the same rounds, the order rotated each round.

A drift of the machine (load from other processes, a VM's speed-state switch, thermal throttling) then hits every
configuration alike, and a comparison survives it where an absolute time does not: each row gets its ratio to a
reference with a 95 % interval (:mod:`quantship.evaluate.stability`), and rounds are added until every interval
is narrow enough or the time is up.

The host drives each configuration through :class:`BenchWorker`, a small protocol: a local process
(:class:`quantship.evaluate.bench.LocalBenchWorker`) and a device reached over SSH (issue 22) implement it alike,
so both can be interleaved in one run. :func:`run_interleaved` knows nothing about processes or runtimes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from quantship.errors import ConfigError, QuantshipError, RemoteConnectionLost
from quantship.evaluate.latency import latency_stats
from quantship.evaluate.stability import (
    RatioEstimate,
    StopReason,
    StopRule,
    ratio_to_reference,
    round_p50s,
    spread,
    stability,
)


@runtime_checkable
class BenchWorker(Protocol):
    """One configuration, timed round by round (the host side; what runs the model is the implementation's).

    Attributes:
        target: The row's name (``tflite-int8``, ``mobilenet@2t``); ``--reference`` matches it.
        artifact: The model file as the user named it; ``--reference FILE`` matches it.

    Calls come in this order: :meth:`start` once, :meth:`round` any number of times, :meth:`finish` once,
    :meth:`close` always (also after an error, and more than once is harmless).
    """

    target: str
    artifact: str

    def start(self) -> dict[str, Any]:
        """Load the model, allocate, run the first inference, warm up.

        Returns:
            The row's identifying and one-off fields. Required: ``target``, ``artifact``, ``runtime``,
            ``threads`` (None: the runtime's default), ``cores`` (list or None), ``cores_in_use`` (int: cores the
            configuration may run on), ``latency_batch`` (the batch :meth:`round` times). Expected:
            ``init_ms``, ``first_inference_ms``, ``warmup_queries``, ``load_average_before``,
            ``cpu_mhz_before``. Any other flat field goes into the row as it is.

        Raises:
            QuantshipError: The configuration cannot run (the host names it; a reference that fails is a
                :class:`ConfigError`).
        """
        ...

    def round(self, queries: int) -> list[float]:
        """Time ``queries`` back-to-back queries at the latency batch; their latencies in milliseconds, in order."""
        ...

    def finish(self) -> dict[str, Any]:
        """After the last round: the fields only the worker can measure (``load_average_after``,
        ``cpu_mhz_after``, ``peak_rss_mb``, ``runtime_ms_*``, ``throughput_ips_b<N>`` of other batch sizes,
        delegate coverage, kernels...), flat."""
        ...

    def close(self) -> None:
        """Release the worker (end its process); idempotent."""
        ...


@dataclass(frozen=True)
class InterleaveOptions:
    """How an interleaved run goes.

    Attributes:
        stop: When to stop adding rounds (precision, minimum rounds, maximum seconds).
        queries_per_round: Queries each configuration runs per round.
        min_queries: Each configuration runs at least this many queries in all ...
        min_seconds: ... and at least this many seconds of timed queries (unless ``stop.max_seconds`` ends the
            run first).
        reference: Target name or file every ratio is taken to (None: the first fp32 configuration of the same
            runtime in a comparison group, else the group's first).
    """

    stop: StopRule = field(default_factory=StopRule)
    queries_per_round: int = 20
    min_queries: int = 200
    min_seconds: float = 5.0
    reference: str | None = None

    def __post_init__(self) -> None:
        if self.queries_per_round <= 0 or self.min_queries <= 0 or self.min_seconds < 0:
            raise ConfigError("queries per round and minimum queries must be positive, minimum seconds not negative")


def rotation(count: int, round_index: int) -> list[int]:
    """The order configurations run in round ``round_index``: ``0..count-1`` rotated left by the round number,
    so each configuration runs first (right after the previous round's last) equally often."""
    return [(round_index + i) % count for i in range(count)]


def comparison_key(info: dict[str, Any]) -> tuple:
    """Rows are compared only within the same latency batch, thread count and cores (``--mobile``'s ``@Nt``
    rows within their thread count)."""
    return (info.get("latency_batch"), info.get("threads"), tuple(info.get("cores") or ()))


def matches_reference(reference: str, target: str, artifact: str) -> bool:
    """``reference`` (``--reference``) names this configuration: its target (``--mobile``'s ``x@2t`` by ``x``)
    or its file."""
    if reference in (target, artifact) or target.split("@")[0] == reference:
        return True
    try:
        return Path(reference).resolve() == Path(artifact).resolve()
    except (OSError, ValueError):
        return False


def check_reference(reference: str | None, workers: Sequence[Any]) -> None:
    """Refuse a ``--reference`` that names none of the configurations (before anything is timed).

    Raises:
        ConfigError: It matches no target name or file.
    """
    if reference is None:
        return
    if not any(matches_reference(reference, w.target, w.artifact) for w in workers):
        names = ", ".join(dict.fromkeys(w.target.split("@")[0] for w in workers))
        raise ConfigError(f"--reference {reference} is none of the configurations benched ({names}): name one of them")


def _is_fp32(info: dict[str, Any]) -> bool:
    return "fp32" in str(info.get("target", "")) or "fp32" in Path(str(info.get("artifact", ""))).stem


def references(infos: Sequence[dict[str, Any]], reference: str | None) -> list[int]:
    """For each configuration, the index of its reference: the one ``reference`` names in its comparison group,
    else the group's first fp32 configuration of the same runtime, else the group's first."""
    out = []
    for info in infos:
        group = [j for j, other in enumerate(infos) if comparison_key(other) == comparison_key(info)]
        named = [
            j for j in group if reference and matches_reference(reference, infos[j]["target"], infos[j]["artifact"])
        ]
        fp32 = [j for j in group if _is_fp32(infos[j]) and infos[j].get("runtime") == info.get("runtime")]
        out.append((named or fp32 or group)[0])
    return out


@dataclass
class InterleavedRun:
    """What :func:`run_interleaved` returns.

    Attributes:
        rows: One flat row per worker, in the workers' order.
        rounds: Rounds run.
        stopped_by: Why it stopped.
        seconds: Wall-clock time of the rounds.
    """

    rows: list[dict[str, Any]]
    rounds: int
    stopped_by: StopReason
    seconds: float

    def summary(self, options: InterleaveOptions) -> str:
        """One line: rounds, queries, and which rule ended the run."""
        widths = [r["ratio_half_width"] for r in self.rows if r.get("reference") not in (None, r["target"])]
        widest = f"widest ratio interval +-{100 * max(widths):.1f} %" if widths else "no ratio to compare"
        why = {
            StopReason.PRECISION: f"every ratio's interval within +-{100 * options.stop.ratio_precision:g} %",
            StopReason.MAX_SECONDS: f"--max-seconds {options.stop.max_seconds:g} reached ({widest})",
            StopReason.NOTHING_TO_COMPARE: "minimum rounds, queries and seconds reached",
        }[self.stopped_by]
        return (
            f"interleaved {len(self.rows)} configuration(s): {self.rounds} rounds of {options.queries_per_round} "
            f"queries each, order rotated every round, {self.seconds:.1f} s; stopped by {self.stopped_by.value}: {why}"
        )


def _estimates(times: list[list[list[float]]], refs: list[int]) -> list[RatioEstimate | None]:
    return [ratio_to_reference(times[i], times[refs[i]]) if len(times[i]) >= 2 else None for i in range(len(times))]


def run_interleaved(
    workers: Sequence[BenchWorker],
    options: InterleaveOptions | None = None,
    on_round: Callable[[int, float], None] | None = None,
) -> InterleavedRun:
    """Start every worker, run rounds (order rotated) until the stopping rule says so, finish every worker, and
    build the rows: the worker's fields, latency percentiles over every query, spread, ratio to the reference with
    its interval, stability.

    The caller closes the workers.

    Args:
        on_round: Called after each round with the round count and the elapsed seconds (progress).

    Raises:
        ConfigError: ``options.reference`` names no worker, or a reference fails to start.
        RemoteConnectionLost: A device worker's device went away or stopped answering (at once, as raised).
        QuantshipError: Another worker fails (as the worker raised it).
    """
    options = options or InterleaveOptions()
    if not workers:
        raise ConfigError("nothing to benchmark")
    check_reference(options.reference, workers)
    infos: list[dict[str, Any] | None] = []
    failures: dict[int, QuantshipError] = {}
    for i, w in enumerate(workers):
        try:
            infos.append(w.start())
        except RemoteConnectionLost:
            raise  # a device gone (or hung past its deadline): the next configurations would only wait for it too
        except QuantshipError as exc:
            failures[i] = exc
            infos.append(None)
    if failures:
        _raise_start_failure(workers, infos, failures, options.reference)
    ready = [info for info in infos if info is not None]
    refs = references(ready, options.reference)
    n = len(workers)
    times: list[list[list[float]]] = [[] for _ in range(n)]
    spent = [0.0] * n  # wall time of each worker's rounds, as the host sees it: what --min-seconds counts
    start = time.perf_counter()
    rounds = 0
    while True:
        for i in rotation(n, rounds):
            t0 = time.perf_counter()
            times[i].append([float(v) for v in workers[i].round(options.queries_per_round)])
            spent[i] += time.perf_counter() - t0
        rounds += 1
        elapsed = time.perf_counter() - start
        if on_round is not None:
            on_round(rounds, elapsed)
        met = all(sum(len(r) for r in t) >= options.min_queries for t in times) and min(spent) >= options.min_seconds
        widths = [1.0]  # before two rounds: a width that never passes
        if rounds >= 2:
            widths = [e.half_width for i, e in enumerate(_estimates(times, refs)) if refs[i] != i]
        reason = options.stop.decide(rounds, elapsed, widths, met)
        if reason is not None:
            break
    seconds = time.perf_counter() - start
    estimates = _estimates(times, refs)
    rows = []
    for i, w in enumerate(workers):
        row = dict(ready[i])
        row.update(w.finish())
        rows.append(_row(row, times[i], estimates[i], ready[refs[i]]["target"], options, reason))
    return InterleavedRun(rows, rounds, reason, seconds)


def _raise_start_failure(
    workers: Sequence[BenchWorker],
    infos: list[dict[str, Any] | None],
    failures: dict[int, QuantshipError],
    reference: str | None,
) -> None:
    """A reference that fails to start is the user's input to fix (ConfigError); any other failure is raised as
    it came."""
    for i, exc in failures.items():
        w = workers[i]
        is_named_reference = reference is not None and matches_reference(reference, w.target, w.artifact)
        # Without --reference, a failed fp32 configuration would have been some row's reference.
        is_default_reference = reference is None and "fp32" in w.target
        if is_named_reference or is_default_reference:
            raise ConfigError(
                f"the reference {w.target} ({w.artifact}) failed to run: {exc}; fix it or pick another with --reference"
            ) from None
    raise next(iter(failures.values()))


def _row(
    row: dict[str, Any],
    rounds: list[list[float]],
    estimate: RatioEstimate | None,
    reference: str,
    options: InterleaveOptions,
    reason: StopReason,
) -> dict[str, Any]:
    every = np.concatenate([np.asarray(r, dtype=np.float64) for r in rounds])
    row.update(latency_stats(every))
    row.update(spread(every))
    medians = round_p50s(rounds)
    row["rounds"] = len(rounds)
    row["queries_per_round"] = options.queries_per_round
    row["round_p50_ms"] = [float(v) for v in medians]
    row["stopped_by"] = reason.value
    row["reference"] = reference
    row.update(estimate.row() if estimate is not None else {})
    b = row.get("latency_batch") or 1
    row[f"throughput_ips_b{b}"] = b * every.size / (every.sum() / 1e3)
    loads = [row.get("load_average_before"), row.get("load_average_after")]
    cores = int(row.get("cores_in_use") or 1)
    row.update(stability(every, medians, cores, loads, int(row.get("unsettled_rounds") or 0)))
    return row


UNSTABLE_NOTE = (
    "note: a ratio whose interval is narrow stays valid when the absolute times are unstable: both sides ran in the "
    "same rounds, so a drift of the machine moved them alike"
)


def stability_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One warning line per unstable row (as pyperf prints them), and the note on ratios if there was one."""
    lines = [
        f"warning: {r['target']}: the benchmark seems unstable: {r['unstable_reason']}"
        for r in rows
        if r.get("stable") is False
    ]
    return lines + [UNSTABLE_NOTE] if lines else lines
