"""MLPerf LoadGen (``mlcommons-loadgen``) as the timing harness: a quantship runner is the system under test.

LoadGen issues the queries, times each one from issue to completion and writes ``mlperf_log_summary.txt`` /
``mlperf_log_detail.txt`` with the scenario's percentiles and whether the run was valid. The SUT here serves
queries from a preloaded sample set (no decoding in the timed path) through :meth:`Runner.infer`, synchronously
on LoadGen's issue thread (SingleStream, MultiStream and Offline call ``issue_queries`` on the calling thread),
so a query's latency is the runner's query latency plus LoadGen's own bookkeeping.

Minimums: MLPerf's rules as LoadGen applies them (``TestSettings.FromConfig`` with the ``mlperf.conf`` built
into LoadGen: 600 s in every scenario, MultiStream at least 662 queries, SingleStream and Offline 100), not
the bare ``TestSettings()`` defaults (10 s, 100 queries). ``min_queries`` / ``min_seconds`` replace them; a
run under lower values is reported as valid only under reduced settings. ``FromConfig`` applies the built-in
rules only on its first call in a process, so each run belongs in a fresh process (``bench`` does that).

The summary/detail parsers import nothing from LoadGen.
"""

from __future__ import annotations

import enum
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import psutil

from quantship.errors import ConfigError, RuntimeBackendError
from quantship.evaluate.latency import latency_stats
from quantship.lazy import lazy_import
from quantship.runtime.base import Runner

SUMMARY = "mlperf_log_summary.txt"
DETAIL = "mlperf_log_detail.txt"


class Scenario(str, enum.Enum):
    """LoadGen scenarios a synchronous SUT can serve (Server needs concurrent queries)."""

    SINGLESTREAM = "singlestream"
    MULTISTREAM = "multistream"
    OFFLINE = "offline"

    @property
    def loadgen_name(self) -> str:
        return {"singlestream": "SingleStream", "multistream": "MultiStream", "offline": "Offline"}[self.value]

    @classmethod
    def parse(cls, text: str) -> "Scenario":
        key = text.strip().lower().replace("-", "").replace("_", "")
        for s in cls:
            if s.value == key:
                return s
        raise ConfigError(f"unknown LoadGen scenario '{text}'; known: {', '.join(s.value for s in cls)}")


@dataclass(frozen=True)
class LoadgenSettings:
    """One LoadGen performance run.

    Attributes:
        scenario: SingleStream (one sample per query, the next issued when the last completes), MultiStream
            (``samples_per_query`` samples per query, run as one batch) or Offline (one query of many samples,
            run in batches of ``batch``).
        min_queries, min_seconds: Replace LoadGen's minimum query count / duration (None: MLPerf's).
        samples_per_query: MultiStream query size (None: LoadGen's, 8).
        batch: Offline batch size.
        expected_latency_ms: Per query (SingleStream, MultiStream) from a short measurement first: LoadGen
            generates its schedule from it and ends a run early, INVALID, when the SUT is faster than expected.
        expected_qps: Offline samples per second, measured likewise.
    """

    scenario: Scenario
    min_queries: int | None = None
    min_seconds: float | None = None
    samples_per_query: int | None = None
    batch: int = 1
    expected_latency_ms: float = 1.0
    expected_qps: float = 1.0


def _user_conf(folder: Path) -> Path:
    # FromConfig needs a user.conf; an empty one leaves MLPerf's built-in rules as they are.
    path = folder / "user.conf"
    path.write_text("# quantship: no overrides of mlperf.conf here; reduced minimums are set on TestSettings\n")
    return path


def _test_settings(lg: Any, settings: LoadgenSettings, folder: Path) -> tuple[Any, dict[str, int]]:
    ts = lg.TestSettings()
    if ts.FromConfig(str(_user_conf(folder)), "quantship", settings.scenario.loadgen_name, 1) != 0:
        raise RuntimeBackendError("LoadGen could not read its built-in mlperf.conf")
    ts.scenario = getattr(lg.TestScenario, settings.scenario.loadgen_name)
    ts.mode = lg.TestMode.PerformanceOnly
    defaults = {"min_query_count": int(ts.min_query_count), "min_duration_ms": int(ts.min_duration_ms)}
    if settings.min_queries is not None:
        ts.min_query_count = int(settings.min_queries)
    if settings.min_seconds is not None:
        ts.min_duration_ms = int(round(settings.min_seconds * 1000))
    if settings.samples_per_query:
        ts.multi_stream_samples_per_query = int(settings.samples_per_query)
    latency_ns = max(1000.0, settings.expected_latency_ms * 1e6)
    ts.single_stream_expected_latency_ns = int(latency_ns)
    ts.multi_stream_expected_latency_ns = int(latency_ns)
    ts.offline_expected_qps = float(max(settings.expected_qps, 1.0))
    return ts, defaults


# LoadGen 6.0.17 holds about 450 bytes per pre-generated query (measured: 1.2 M queries, 540 MB).
BYTES_PER_QUERY = 450


def _check_schedule_memory(settings: LoadgenSettings, min_duration_ms: float) -> None:
    """Refuse a schedule that would not fit in memory: LoadGen pre-generates about twice the queries the expected
    latency allows in the minimum duration (a fast model under MLPerf's 600 s means millions)."""
    if settings.scenario is Scenario.OFFLINE:
        return

    queries = 2 * min_duration_ms / max(settings.expected_latency_ms, 1e-3)
    need = queries * BYTES_PER_QUERY
    available = psutil.virtual_memory().available
    if need > 0.5 * available:
        raise ConfigError(
            f"LoadGen would pre-generate about {queries / 1e6:.0f} M queries ({need / 2**30:.1f} GiB, "
            f"{available / 2**30:.1f} GiB available) for {min_duration_ms / 1000:g} s at "
            f"{settings.expected_latency_ms:.3f} ms per query: lower --min-seconds"
        )


class _SystemUnderTest:
    """LoadGen's SUT and QSL callbacks around a runner: queries served from the preloaded samples, the runner's
    time per call and the first error kept."""

    def __init__(
        self, lg: Any, runner: Runner, samples: Sequence[dict[str, np.ndarray]], settings: LoadgenSettings, raw: bool
    ):
        self.lg, self.runner, self.settings, self.raw = lg, runner, settings, raw
        self.names = list(samples[0])
        self.stacked = {k: np.concatenate([s[k] for s in samples]) for k in self.names}
        self.loaded: set[int] = set()
        self.runtime_s: list[float] = []
        self.failure: list[BaseException] = []
        self.batch = settings.batch if settings.scenario is Scenario.OFFLINE else 0

    def load_samples(self, indices: list[int]) -> None:
        """QSL: the samples are in memory already, so loading them is remembering the indices."""
        self.loaded.update(indices)

    def unload_samples(self, indices: list[int]) -> None:
        """QSL: forget the indices."""
        self.loaded.difference_update(indices)

    def _feed(self, idx: list[int]) -> dict[str, np.ndarray]:
        """The runner's feed for the samples ``idx`` (one sample: a slice of the stacked arrays)."""
        if len(idx) == 1:
            return {k: self.stacked[k][idx[0] : idx[0] + 1] for k in self.names}
        return {k: np.take(self.stacked[k], idx, axis=0) for k in self.names}

    def run(self, query_samples: list[Any]) -> None:
        """Run the runner once on ``query_samples`` and complete them with its first output's rows."""
        lg = self.lg
        # Responses point at the outputs, kept alive until QuerySamplesComplete has returned.
        idx = [q.index for q in query_samples]
        out = self.runner.infer(self._feed(idx), raw=self.raw)
        self.runtime_s.append(self.runner.last_inference_time)
        first = np.ascontiguousarray(next(iter(out.values())))
        rows = [first[i] for i in range(len(idx))] if first.ndim and first.shape[0] == len(idx) else [first] * len(idx)
        lg.QuerySamplesComplete(
            [lg.QuerySampleResponse(q.id, r.ctypes.data, r.nbytes) for q, r in zip(query_samples, rows)]
        )

    def issue_queries(self, query_samples: list[Any]) -> None:
        """SUT: serve the queries as the scenario groups them (Offline in batches, MultiStream as one, else one by
        one); after an error, complete the rest empty and keep the error."""
        lg, batch = self.lg, self.batch
        # An exception escaping this callback leaves LoadGen unable to finish (the process aborts at exit):
        # complete every sample, remember the error, raise it once the test is over.
        done = 0
        try:
            if batch:
                for start in range(0, len(query_samples), batch):
                    self.run(query_samples[start : start + batch])
                    done = start + batch
            elif self.settings.scenario is Scenario.MULTISTREAM:
                self.run(query_samples)
                done = len(query_samples)
            else:
                for i, q in enumerate(query_samples):
                    self.run([q])
                    done = i + 1
        except BaseException as exc:  # noqa: BLE001 - re-raised after StartTest returns
            if not self.failure:
                self.failure.append(exc)
            lg.QuerySamplesComplete([lg.QuerySampleResponse(q.id, 0, 0) for q in query_samples[done:]])

    def flush_queries(self) -> None:
        """SUT: nothing is held back, so nothing to flush."""

    def raise_failure(self) -> None:
        """Raise the first error of the run, if any, as a :class:`RuntimeBackendError`."""
        if self.failure:
            exc = self.failure[0]
            if isinstance(exc, RuntimeBackendError):
                raise exc
            raise RuntimeBackendError(f"{self.runner.name}: failed under LoadGen: {type(exc).__name__}: {exc}") from exc


def _log_settings(lg: Any, folder: Path) -> Any:
    """LoadGen's log settings: ``mlperf_log_*`` files in ``folder``, nothing copied to stdout, no trace."""
    out_settings = lg.LogOutputSettings()
    out_settings.outdir = str(folder)
    out_settings.prefix = "mlperf_log_"
    out_settings.copy_summary_to_stdout = False
    out_settings.copy_detail_to_stdout = False
    log_settings = lg.LogSettings()
    log_settings.log_output = out_settings
    log_settings.enable_trace = False
    return log_settings


def _start_test(lg: Any, sut: _SystemUnderTest, count: int, ts: Any, folder: Path) -> float:
    """Run the LoadGen test on ``count`` samples, SUT and QSL destroyed afterwards whatever happens; its wall time
    in seconds."""
    log_settings = _log_settings(lg, folder)
    sut_handle = lg.ConstructSUT(sut.issue_queries, sut.flush_queries)
    qsl = lg.ConstructQSL(count, count, sut.load_samples, sut.unload_samples)
    start = time.perf_counter()
    try:
        # A ./audit.config would turn this into a compliance test: point LoadGen at a file that does not exist.
        lg.StartTestWithLogSettings(sut_handle, qsl, ts, log_settings, str(folder / "no-audit.config"))
    finally:
        lg.DestroyQSL(qsl)
        lg.DestroySUT(sut_handle)
    return time.perf_counter() - start


def _result_row(
    folder: Path, defaults: dict[str, int], settings: LoadgenSettings, wall: float, runtime_s: list[float]
) -> dict[str, Any]:
    """The row of a finished run: LoadGen's figures from its detail log, the log folder, the wall time and
    ``runtime_ms_*`` over the runner's calls."""
    row = loadgen_row(parse_detail(folder / DETAIL), defaults, settings)
    row.update(loadgen_log_dir=str(folder), loadgen_wall_s=wall, iterations=len(runtime_s))
    if runtime_s:
        row.update(latency_stats(np.asarray(runtime_s) * 1e3, "runtime_ms"))
    return row


def run_loadgen(
    runner: Runner,
    samples: Sequence[dict[str, np.ndarray]],
    settings: LoadgenSettings,
    log_dir: str | Path,
    raw: bool = False,
) -> dict[str, Any]:
    """Run one LoadGen performance test with ``runner`` as the system under test.

    Args:
        runner: An active runner.
        samples: The preloaded sample set, one feed of batch 1 per sample (LoadGen's QSL indexes into it).
        settings: Scenario and minimums.
        log_dir: LoadGen's log folder (created).
        raw: Feed the samples raw (already in the model's own input types).

    Returns:
        The row fields (:func:`loadgen_row`) plus ``runtime_ms_*`` over the runner's calls.

    Raises:
        RuntimeBackendError: The runner failed during the run (raised after LoadGen has finished cleanly).
    """
    lg = lazy_import("mlperf_loadgen", "mlcommons-loadgen", "bench --loadgen")
    folder = Path(log_dir)
    folder.mkdir(parents=True, exist_ok=True)  # LoadGen cannot create it, and aborts at exit when it is missing
    ts, defaults = _test_settings(lg, settings, folder)
    _check_schedule_memory(settings, ts.min_duration_ms)
    sut = _SystemUnderTest(lg, runner, samples, settings, raw)
    wall = _start_test(lg, sut, len(samples), ts, folder)
    sut.raise_failure()
    return _result_row(folder, defaults, settings, wall, sut.runtime_s)


# ---------------------------------------------------------------------------------------------------- logs
_KV = re.compile(r"^([^:]+?)\s*:\s*(.*?)\s*$")
_COUNT = re.compile(r"^(\d+|No) (warning|ERROR)s? encountered", re.IGNORECASE)


def _number(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_summary(path: str | Path) -> dict[str, Any]:
    """``mlperf_log_summary.txt`` as a flat ``{key: value}`` dict, numbers converted.

    The format (LoadGen 6.0.17): banner lines of ``=`` around the section titles; ``key : value`` lines, the key
    padded with spaces and sometimes without a space before the colon (``Early stopping satisfied: Yes``,
    ``Samples per second: 48597.7``); a key with an empty value opens a list of `` * text`` lines
    (``Recommendations``, ``Early Stopping Result``); ``N warning(s)`` / ``N ERROR(s) encountered`` or
    ``No warnings`` / ``No errors encountered`` at the end, returned as ``warnings`` / ``errors`` counts.
    """
    out: dict[str, Any] = {"warnings": 0, "errors": 0}
    block = None
    for raw_line in Path(path).read_text().splitlines():
        line = raw_line.strip()
        if not line or set(line) == {"="}:
            continue
        if line.startswith("*") and block:
            out[block].append(line[1:].strip())
            continue
        m = _COUNT.match(line)
        if m:
            key = "warnings" if m.group(2).lower() == "warning" else "errors"
            out[key] = 0 if m.group(1) == "No" else int(m.group(1))
            block = None
            continue
        m = _KV.match(line)
        if m and m.group(2) == "":
            block = m.group(1)
            out[block] = []
            continue
        block = None
        if m:
            out[m.group(1)] = _number(m.group(2))
    return out


def parse_detail(path: str | Path) -> dict[str, Any]:
    """``mlperf_log_detail.txt`` (one ``:::MLLOG {json}`` record per line) as ``{key: value}`` (the last record
    of a key wins), with ``_errors`` / ``_warnings``: ``key: value`` of the records LoadGen marked as such."""
    out: dict[str, Any] = {"_errors": [], "_warnings": []}
    for line in Path(path).read_text().splitlines():
        if not line.startswith(":::MLLOG "):
            continue
        rec = json.loads(line[len(":::MLLOG ") :])
        key, value, meta = rec.get("key"), rec.get("value"), rec.get("metadata") or {}
        if meta.get("is_error"):
            out["_errors"].append(f"{key}: {value}")
        elif meta.get("is_warning"):
            out["_warnings"].append(f"{key}: {value}")
        out[key] = value
    return out


_PERCENTILE_KEY = re.compile(r"^result_(\d+\.\d+)_percentile_latency_ns$")


def percentile_column(p: float) -> str:
    """``latency_ms_p50``, ``latency_ms_p99_9``: the column of a LoadGen percentile."""
    text = f"{p:g}".replace(".", "_")
    return f"latency_ms_p{text}"


def loadgen_row(
    detail: dict[str, Any], defaults: dict[str, int] | None = None, settings: LoadgenSettings | None = None
) -> dict[str, Any]:
    """The row fields of a LoadGen run, from its parsed detail log.

    ``latency_ms_*`` are LoadGen's per-query latencies (a MultiStream query is ``samples_per_query`` samples;
    Offline has one query, so it reports samples per second as ``throughput_ips_b<batch>`` instead).
    ``validity`` says ``VALID``, ``VALID only under reduced settings (...)`` when the minimums were below
    ``defaults`` (MLPerf's), or ``INVALID (...)`` with LoadGen's reasons.
    """
    scenario = str(detail.get("effective_scenario", "")).replace(" ", "")
    row: dict[str, Any] = {"harness": "loadgen", "loadgen_scenario": scenario.lower()}
    result = detail.get("result_validity")
    row["loadgen_result"] = result
    row["loadgen_valid"] = result == "VALID"
    # What was asked for: Offline turns the query count into a sample count (its effective count is 1 query).
    min_q = detail.get("requested_min_query_count", detail.get("effective_min_query_count"))
    min_ms = detail.get("requested_min_duration_ms", detail.get("effective_min_duration_ms"))
    spq = detail.get("effective_samples_per_query")
    queries = detail.get("result_query_count")
    row.update(
        loadgen_min_query_count=min_q,
        loadgen_min_duration_ms=min_ms,
        loadgen_min_sample_count=detail.get("effective_min_sample_count"),
        loadgen_samples_per_query=spq,
        loadgen_queries=queries,
        loadgen_samples=(queries * spq) if isinstance(queries, int) and isinstance(spq, int) else None,
        loadgen_target_percentile=detail.get("effective_target_latency_percentile"),
        loadgen_errors=len(detail.get("_errors", [])),
        loadgen_warnings=len(detail.get("_warnings", [])),
    )
    if scenario == "Offline":
        sps = detail.get("result_samples_per_second")
        row["loadgen_samples_per_second"] = sps
        row[f"throughput_ips_b{settings.batch if settings else 1}"] = sps
    else:
        for key, value in detail.items():
            m = _PERCENTILE_KEY.match(key)
            if m and isinstance(value, (int, float)):
                row[percentile_column(float(m.group(1)))] = value / 1e6
        for stat in ("min", "mean", "max"):
            value = detail.get(f"result_{stat}_latency_ns")
            if isinstance(value, (int, float)):
                row[f"latency_ms_{stat}"] = value / 1e6
        qps = detail.get("result_qps_with_loadgen_overhead")
        if isinstance(qps, (int, float)):
            row["loadgen_qps"] = qps
        early = detail.get("early_stopping_latency_ss" if scenario == "SingleStream" else "early_stopping_latency_ms")
        if isinstance(early, (int, float)) and early > 0:
            row["loadgen_early_stopping_ms"] = early / 1e6
        if isinstance(queries, int) and row.get("latency_ms_mean"):
            row[f"throughput_ips_b{spq or 1}"] = (spq or 1) * 1e3 / row["latency_ms_mean"]
    reduced = []
    if defaults:
        if isinstance(min_q, int) and min_q < defaults["min_query_count"]:
            reduced.append(f"min_query_count {min_q} < {defaults['min_query_count']}")
        if isinstance(min_ms, int) and min_ms < defaults["min_duration_ms"]:
            reduced.append(f"min_duration {min_ms / 1000:g} s < {defaults['min_duration_ms'] / 1000:g} s")
    row["loadgen_reduced"] = bool(reduced)
    row["loadgen_default_min_query_count"] = defaults["min_query_count"] if defaults else None
    row["loadgen_default_min_duration_ms"] = defaults["min_duration_ms"] if defaults else None
    if result != "VALID":
        reasons = [
            what
            for what, ok in (
                ("min duration not met", detail.get("result_min_duration_met")),
                ("min queries not met", detail.get("result_min_queries_met")),
                ("early stopping not met", detail.get("early_stopping_met")),
            )
            if ok is False
        ]
        reasons += [e for e in detail.get("_errors", []) if e]
        row["validity"] = f"INVALID ({'; '.join(reasons) or 'see the detail log'})"
    elif reduced:
        row["validity"] = f"VALID only under reduced settings ({', '.join(reduced)})"
    else:
        row["validity"] = "VALID"
    return row


def expected_from(timings_ms: np.ndarray, per_query_samples: int = 1) -> tuple[float, float]:
    """Expected latency (ms per query) and samples per second for LoadGen's schedule, from warm-up timings.

    The latency is 3/4 of the median and the rate 1.5 times the measured one: LoadGen ends a run early
    (INVALID) when the SUT outruns its schedule, and only costs a longer run the other way round.
    """
    median = float(np.median(timings_ms))
    return 0.75 * median, 1.5 * per_query_samples * 1e3 / median
