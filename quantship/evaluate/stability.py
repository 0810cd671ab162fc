"""Statistics that make latency comparable on a noisy machine: per-round ratios with an interval, the stopping
rule of an interleaved run, and the checks that mark a row unstable.

Pure functions over timings in milliseconds (no runtime, no process): what an interleaved bench
(:mod:`quantship.evaluate.interleave`) records per round goes in, row fields come out.

* Ratio to a reference: in every round each configuration's p50 is divided by the reference's p50 of the same
  round, and the ratio is the median over rounds (as ``benchmarks/int8_cpu.py`` does it). A slow drift of the
  machine, or a switch between two speed states, moves both p50s of a round alike and cancels in the ratio.
* Its 95 % interval: the distribution-free interval of that median over rounds (two order statistics chosen by
  the binomial distribution: exact whatever the distribution of the per-round ratios, deterministic).
* Stability of one configuration's absolute times: coefficient of variation over all queries, two clusters in its
  per-round medians (a speed-state switch: some VMs run the same model at 7.5 ms, then at 4.8 ms), and the load
  average against the cores the configuration uses. A ratio with a narrow interval stays valid when the absolute
  times are unstable.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from enum import Enum
from math import lgamma, log
from typing import Any, Sequence

import numpy as np

from quantship.errors import ConfigError

CONFIDENCE = 0.95
COV_LIMIT = 0.10  # above this the absolute times of a row are called unstable (trtexec's and pyperf's rule)
# A speed switch: the per-round medians fall into two groups whose means differ by at least SWITCH_GAP (relative)
# and by at least SWITCH_SEPARATION pooled within-group standard deviations, each group holding at least
# SWITCH_MIN_SHARE of the rounds (and two rounds). Independent noise alone rarely separates that cleanly.
SWITCH_GAP = 0.10
SWITCH_SEPARATION = 4.0
SWITCH_MIN_SHARE = 0.15


@dataclass(frozen=True)
class RatioEstimate:
    """A ratio to a reference with its interval.

    Attributes:
        ratio: Median over rounds of the per-round p50 ratio.
        low, high: The 95 % interval.
        rounds: Rounds it is computed from.
        method: How the interval was computed (goes into the row as ``ratio_interval``).
    """

    ratio: float
    low: float
    high: float
    rounds: int
    method: str

    @property
    def half_width(self) -> float:
        """Half the interval's width relative to the ratio (0.03: within +-3 %)."""
        return (self.high - self.low) / 2 / self.ratio if self.ratio > 0 else float("inf")

    def row(self) -> dict[str, Any]:
        return {
            "ratio_to_reference": self.ratio,
            "ratio_ci_low": self.low,
            "ratio_ci_high": self.high,
            "ratio_interval": self.method,
            "ratio_half_width": self.half_width,
        }


def round_p50s(rounds: Sequence[Sequence[float]]) -> np.ndarray:
    """The median of each round's query times."""
    return np.array([float(np.median(r)) for r in rounds])


def median_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """Distribution-free interval of the median: order statistics ``x_(j) .. x_(n+1-j)`` (1-based), ``j`` the
    largest with binomial coverage ``1 - 2 P(Binomial(n, 1/2) <= j - 1) >= confidence``.

    Exact for independent rounds whatever their distribution (no resampling, no seed). Below 6 rounds no pair
    reaches 95 %: the range (min..max) is returned with its lower coverage.

    Returns:
        (low, high, actual coverage).
    """

    x = np.sort(np.asarray(values, dtype=np.float64))
    n = x.size
    # P(B <= i) from log-probabilities: comb(n, i) / 2**n overflows a float from n = 1024 rounds (a fast model
    # under --max-seconds reaches that).
    log_pmf = [lgamma(n + 1) - lgamma(i + 1) - lgamma(n - i + 1) - n * log(2.0) for i in range(n + 1)]
    cdf = np.cumsum(np.exp(log_pmf))
    j = 1
    while j + 1 <= n // 2 and 1 - 2 * cdf[j] >= confidence:  # j + 1 keeps the coverage: widen no further
        j += 1
    coverage = 1 - 2 * cdf[j - 1]
    return float(x[j - 1]), float(x[n - j]), float(coverage)


def ratio_to_reference(
    rounds: Sequence[Sequence[float]],
    reference_rounds: Sequence[Sequence[float]],
    confidence: float = CONFIDENCE,
) -> RatioEstimate:
    """Median over rounds of (round p50 / reference's round p50), with a distribution-free interval of that median
    (:func:`median_interval`).

    A percentile bootstrap of the median was tried first: with 10-40 rounds it is too narrow (on this VM, an
    identical copy's interval of +-1.8 % after 11 rounds missed 1.0), and a run that stops as soon as its
    interval is narrow needs an interval that does not flatter small samples.

    Args:
        rounds, reference_rounds: Per-round query times (ms) of the configuration and of its reference, the
            same rounds in the same order.

    Raises:
        ValueError: Different round counts, or fewer than two rounds.
    """
    if len(rounds) != len(reference_rounds):
        raise ValueError(f"{len(rounds)} rounds against the reference's {len(reference_rounds)}")
    if len(rounds) < 2:
        raise ValueError("a ratio interval needs at least two rounds")
    per_round = round_p50s(rounds) / round_p50s(reference_rounds)
    n = per_round.size
    low, high, coverage = median_interval(per_round, confidence)
    method = f"order statistics of the median over {n} rounds (distribution-free, {100 * coverage:.1f} % coverage)"
    return RatioEstimate(float(np.median(per_round)), low, high, n, method)


class StopReason(str, Enum):
    """Why an interleaved run ended."""

    PRECISION = "precision"  # every ratio's interval within --ratio-precision
    MAX_SECONDS = "max-seconds"  # time up before that
    NOTHING_TO_COMPARE = "minimums"  # no ratio to refine: stopped once the minimum rounds/queries/seconds were met


@dataclass(frozen=True)
class StopRule:
    """When an interleaved run stops adding rounds.

    Attributes:
        ratio_precision: Stop when every ratio's interval half-width (relative) is within this fraction.
        min_rounds: Never fewer rounds unless time is up (at least 2: an interval needs them).
        max_seconds: Stop after this much timing (wall clock) even when the precision or ``min_rounds`` is not
            reached (after two rounds at least).
    """

    ratio_precision: float = 0.03
    min_rounds: int = 10
    max_seconds: float = 60.0

    def __post_init__(self) -> None:
        p = self.ratio_precision
        if not isinstance(p, (int, float)) or not 0 < p < 1:  # NaN fails both comparisons
            raise ConfigError(f"--ratio-precision must be a fraction between 0 and 1 (0.03 is +-3 %), got {p}")
        if isinstance(self.min_rounds, bool) or not isinstance(self.min_rounds, int) or self.min_rounds < 2:
            raise ConfigError(f"--min-rounds must be at least 2 (an interval needs two rounds), got {self.min_rounds}")
        s = self.max_seconds
        if not isinstance(s, (int, float)) or not 0 < s < float("inf"):
            raise ConfigError(f"--max-seconds must be a positive number of seconds, got {s}")

    def decide(
        self, rounds: int, elapsed: float, half_widths: Sequence[float], minimums_met: bool = True
    ) -> StopReason | None:
        """The reason to stop after ``rounds`` rounds and ``elapsed`` seconds, or None to run another round.

        Args:
            half_widths: The current relative half-width of every ratio (empty: nothing to compare).
            minimums_met: Every configuration has its minimum queries and seconds.
        """
        if elapsed >= self.max_seconds and rounds >= 2:  # the time limit is hard: a run always ends
            return StopReason.MAX_SECONDS
        if rounds < self.min_rounds:
            return None
        if not minimums_met:
            return None
        if not half_widths:
            return StopReason.NOTHING_TO_COMPARE
        if max(half_widths) <= self.ratio_precision:
            return StopReason.PRECISION
        return None


def spread(ms: Sequence[float]) -> dict[str, float]:
    """``latency_ms_std`` and ``latency_cov`` (standard deviation over the mean) of query times."""
    x = np.asarray(ms, dtype=np.float64)
    std = float(x.std(ddof=1)) if x.size > 1 else 0.0
    mean = float(x.mean())
    return {"latency_ms_std": std, "latency_cov": std / mean if mean > 0 else float("inf")}


@dataclass(frozen=True)
class SpeedSwitch:
    """Two clusters found in per-round medians."""

    fast_ms: float
    slow_ms: float
    fast_rounds: int
    slow_rounds: int

    def describe(self) -> str:
        return (
            f"per-round medians split into two speeds ({self.fast_ms:.3g} ms in {self.fast_rounds} rounds, "
            f"{self.slow_ms:.3g} ms in {self.slow_rounds}): the machine switched speed state"
        )


def speed_switch(round_medians: Sequence[float]) -> SpeedSwitch | None:
    """Two clusters in per-round medians (a speed-state switch), or None.

    The best split of the sorted medians into two groups (least within-group squared error: 1-D 2-means, exact)
    counts as a switch when the groups' means differ by at least :data:`SWITCH_GAP` of the faster one and by at
    least :data:`SWITCH_SEPARATION` pooled within-group standard deviations, and each group holds at least
    :data:`SWITCH_MIN_SHARE` of the rounds and two rounds.
    """
    x = np.sort(np.asarray(round_medians, dtype=np.float64))
    n = x.size
    least = max(2, int(np.ceil(SWITCH_MIN_SHARE * n)))
    if n < 2 * least:
        return None
    best = None
    for k in range(least, n - least + 1):
        a, b = x[:k], x[k:]
        sse = float(((a - a.mean()) ** 2).sum() + ((b - b.mean()) ** 2).sum())
        if best is None or sse < best[0]:
            best = (sse, k)
    sse, k = best
    fast, slow = x[:k], x[k:]
    pooled = np.sqrt(sse / (n - 2))
    gap = slow.mean() - fast.mean()
    if gap < SWITCH_GAP * fast.mean() or gap < SWITCH_SEPARATION * pooled:
        return None
    return SpeedSwitch(float(fast.mean()), float(slow.mean()), int(k), int(n - k))


def load_average() -> float | None:
    """The 1-minute load average, or None where the system has none."""
    try:
        return float(os.getloadavg()[0])
    except (OSError, AttributeError):
        return None


def cpu_mhz(cores: Sequence[int] | None = None) -> float | None:
    """Mean current frequency (MHz) of ``cores`` (None: all), from cpufreq or ``/proc/cpuinfo``; None where neither
    is readable (many VMs report a fixed nominal value: read it as what the kernel says, not a measurement)."""
    values = []
    for core in cores if cores is not None else range(os.cpu_count() or 1):
        try:
            with open(f"/sys/devices/system/cpu/cpu{core}/cpufreq/scaling_cur_freq") as f:
                values.append(int(f.read().strip()) / 1e3)
        except (OSError, ValueError):
            values = []
            break
    if values:
        return float(np.mean(values))
    try:
        mhz = {}
        core = None
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("processor"):
                    core = int(line.split(":")[1])
                elif line.startswith("cpu MHz") and core is not None:
                    mhz[core] = float(line.split(":")[1])
    except (OSError, ValueError):
        return None
    chosen = [v for c, v in mhz.items() if cores is None or c in cores]
    return float(np.mean(chosen)) if chosen else None


def machine_state(cores: Sequence[int] | None = None) -> dict[str, float | None]:
    """Load average and CPU frequency now (recorded before and after each configuration's timing)."""
    return {"load_average": load_average(), "cpu_mhz": cpu_mhz(cores)}


# After its last call a runtime's thread pool keeps spinning for a while: ONNX Runtime's, at its default options,
# kept one core busy for ~45 ms on the 2-core VM. In an interleaved round that core is taken from the next
# configuration, whose first ~45 ms then run at half speed (a fast model spends more of its queries there:
# int8/fp32 of MobileNetV2 read 0.82x instead of 0.66x). A worker therefore waits, after each round, until its
# threads are idle. The kernel may charge a running thread's time only at its scheduler tick (4 ms here), so a
# window shorter than two ticks can look idle while a thread spins.
SETTLE_WINDOW_S = 0.012
SETTLE_LIMIT_S = 0.5


def _other_threads_running() -> bool:
    """Whether a thread of this process other than the caller is running or waiting for a CPU (Linux; False where
    ``/proc`` is not): a spinning thread that a loaded machine keeps off the CPU uses no CPU time meanwhile."""
    me = str(threading.get_native_id())
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return False
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if tid != me and state == "R":
            return True
    return False


def settle_threads(window: float = SETTLE_WINDOW_S, limit: float = SETTLE_LIMIT_S) -> tuple[float, bool]:
    """Wait until this process's threads stop using the CPU: a ``window`` in which the process's CPU time grew
    by less than a tenth of it (the caller sleeps meanwhile) and after which no other thread of it is runnable,
    or ``limit`` seconds.

    Returns:
        (seconds waited, whether the threads went idle within ``limit``).
    """
    start = time.perf_counter()
    before = time.process_time()
    while True:
        time.sleep(window)
        now, waited = time.process_time(), time.perf_counter() - start
        if now - before < window / 10 and not _other_threads_running():
            return waited, True
        if waited >= limit:
            return waited, False
        before = now


def stability(
    query_ms: Sequence[float],
    round_medians: Sequence[float],
    cores_in_use: int,
    loads: Sequence[float | None] = (),
    unsettled_rounds: int = 0,
) -> dict[str, Any]:
    """``stable`` and ``unstable_reason`` (None when stable) of one configuration's absolute times.

    Args:
        query_ms: Every timed query.
        round_medians: Its per-round medians (in time order).
        cores_in_use: Cores the configuration may run on.
        loads: Load averages recorded around its timing (None entries: not readable).
        unsettled_rounds: Rounds after which its threads still used the CPU at the settle limit
            (:func:`~quantship.evaluate.stability.settle_threads`).
    """
    reasons = []
    cov = spread(query_ms)["latency_cov"]
    if cov > COV_LIMIT:
        reasons.append(f"coefficient of variation {cov:.2f} > {COV_LIMIT:.2f}")
    switch = speed_switch(round_medians)
    if switch is not None:
        reasons.append(switch.describe())
    high = [v for v in loads if v is not None and v > cores_in_use]
    if high:
        reasons.append(f"load average {max(high):.1f} > {cores_in_use} core(s) in use")
    if unsettled_rounds:
        reasons.append(
            f"its threads still used the CPU {SETTLE_LIMIT_S:g} s after {unsettled_rounds} of its rounds: the next "
            "configuration's round shared the cores with them (ratios too may be off)"
        )
    return {"stable": not reasons, "unstable_reason": "; ".join(reasons) or None}
