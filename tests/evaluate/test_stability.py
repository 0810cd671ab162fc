"""Latency statistics on synthetic timings (issue 23): per-round ratios and their interval, the stopping rule, the
speed-switch and load checks. No runtime: the timings are generated, so every expectation is exact or seeded."""

from __future__ import annotations

import numpy as np
import pytest

from quantship.errors import ConfigError
from quantship.evaluate.stability import (
    StopReason,
    StopRule,
    ratio_to_reference,
    settle_threads,
    speed_switch,
    spread,
    stability,
)


def _rounds(rng, p50s, per_round=20, cov=0.05):
    """Per-round query times around each round's p50 (log-normal noise)."""
    return [list(m * rng.lognormal(0, cov, per_round)) for m in p50s]


def test_identical_streams_have_an_interval_containing_one():
    rng = np.random.default_rng(1)
    hits = 0
    for _ in range(20):
        drift = 5 * (1 + 0.5 * np.sin(np.linspace(0, 3, 20)))  # the machine's speed drifts; both streams see it
        est = ratio_to_reference(_rounds(rng, drift), _rounds(rng, drift))
        hits += est.low <= 1.0 <= est.high
        assert est.half_width < 0.05 and "order statistics" in est.method and "20 rounds" in est.method
    assert hits >= 18


def test_ratio_cancels_a_speed_switch_and_a_real_difference_is_outside_the_interval():
    rng = np.random.default_rng(2)
    speed = np.r_[np.full(10, 7.5), np.full(10, 4.8)]  # a VM's two speed states within one run
    est = ratio_to_reference(_rounds(rng, 0.6 * speed), _rounds(rng, speed))
    assert est.low <= 0.6 <= est.high and est.high < 0.65 and est.low > 0.55
    assert not est.low <= 1.0 <= est.high
    assert est.row()["ratio_to_reference"] == est.ratio and est.row()["ratio_interval"] == est.method


def test_median_interval_is_distribution_free():
    from math import comb

    from quantship.evaluate.stability import median_interval

    # n = 20: ranks 6 and 15 (1-based), coverage 1 - 2 P(B <= 5) = 95.9 %; rank 7..14 would give 88.5 %.
    low, high, cover = median_interval(np.arange(1.0, 21.0))
    assert (low, high) == (6.0, 15.0) and cover == pytest.approx(1 - 2 * sum(comb(20, i) for i in range(6)) / 2**20)
    assert median_interval([3.0, 1.0, 2.0, 5.0, 4.0]) == (1.0, 5.0, pytest.approx(1 - 2 / 32))  # 5 rounds: the range
    # Coverage on a skewed, heavy-tailed distribution (what per-round ratios of a loaded machine look like).
    rng = np.random.default_rng(7)
    draw = lambda n: rng.lognormal(0, 0.05, n) * (1 + rng.pareto(3, n))  # noqa: E731
    true_median = float(np.median(draw(200_000)))
    hits = 0
    for _ in range(400):
        low, high, _ = median_interval(draw(12))
        hits += low <= true_median <= high
    assert hits >= 0.93 * 400


def test_reference_against_itself_and_bad_round_counts():
    rounds = [[1.0, 2.0, 3.0]] * 4
    est = ratio_to_reference(rounds, rounds)
    assert (est.ratio, est.low, est.high, est.half_width) == (1.0, 1.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="two rounds"):
        ratio_to_reference(rounds[:1], rounds[:1])
    with pytest.raises(ValueError, match="3 rounds against the reference's 4"):
        ratio_to_reference(rounds[:3], rounds)


def test_planted_speed_switch_is_flagged_identical_distributions_are_not():
    rng = np.random.default_rng(3)
    switched = np.r_[7.5 * rng.lognormal(0, 0.02, 10), 4.8 * rng.lognormal(0, 0.02, 10)]
    found = speed_switch(switched)
    assert found is not None and (found.fast_rounds, found.slow_rounds) == (10, 10)
    assert found.fast_ms == pytest.approx(4.8, rel=0.03) and found.slow_ms == pytest.approx(7.5, rel=0.03)
    # Noise alone (medians of one distribution, even a wide one) never looks like two speeds.
    for seed in range(50):
        noise = np.random.default_rng(100 + seed).lognormal(np.log(5), 0.04, 20)
        assert speed_switch(noise) is None, seed
    # One outlier round is not a switch (each cluster needs two rounds and 15 % of them).
    assert speed_switch(np.r_[np.full(19, 5.0) * rng.lognormal(0, 0.01, 19), 9.0]) is None


def test_stability_reasons():
    rng = np.random.default_rng(4)
    quiet = 5 * rng.lognormal(0, 0.02, 400)
    medians = [float(np.median(quiet[i : i + 20])) for i in range(0, 400, 20)]
    assert stability(quiet, medians, 2, [0.5, 1.0]) == {"stable": True, "unstable_reason": None}
    noisy = stability(5 * rng.lognormal(0, 0.3, 400), medians, 2, [0.5, 3.5])
    assert not noisy["stable"]
    assert "coefficient of variation" in noisy["unstable_reason"] and "load average 3.5 > 2" in noisy["unstable_reason"]
    switched = np.r_[np.full(10, 7.5), np.full(10, 4.8)]
    assert "two speeds" in stability(quiet, switched, 2)["unstable_reason"]
    assert (
        "still used the CPU 0.5 s after 3 of its rounds"
        in stability(quiet, medians, 2, unsettled_rounds=3)["unstable_reason"]
    )
    s = spread([1.0, 1.0, 1.0])
    assert s == {"latency_ms_std": 0.0, "latency_cov": 0.0}


def test_stop_rule():
    rule = StopRule(ratio_precision=0.03, min_rounds=3, max_seconds=10)
    assert rule.decide(2, 0.0, [0.01]) is None  # fewer than min_rounds, even with the precision reached
    assert rule.decide(2, 11.0, [0.5]) is StopReason.MAX_SECONDS  # the time limit is hard, past two rounds
    assert rule.decide(1, 11.0, [0.5]) is None
    assert rule.decide(3, 1.0, [0.01, 0.02]) is StopReason.PRECISION
    assert rule.decide(3, 1.0, [0.01, 0.05]) is None
    assert rule.decide(3, 10.0, [0.01, 0.05]) is StopReason.MAX_SECONDS
    assert rule.decide(3, 1.0, [0.01], minimums_met=False) is None
    assert rule.decide(3, 1.0, []) is StopReason.NOTHING_TO_COMPARE


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(ratio_precision=0), "--ratio-precision"),
        (dict(ratio_precision=1), "--ratio-precision"),
        (dict(ratio_precision=float("nan")), "--ratio-precision"),
        (dict(min_rounds=1), "--min-rounds must be at least 2"),
        (dict(max_seconds=0), "--max-seconds"),
        (dict(max_seconds=float("inf")), "--max-seconds"),
    ],
)
def test_stop_rule_refuses(kw, message):
    with pytest.raises(ConfigError, match=message):
        StopRule(**kw)


def test_median_interval_of_many_rounds():
    """A fast model under --max-seconds runs thousands of rounds: comb(n, i) / 2**n overflowed a float at n = 1024."""
    from quantship.evaluate.stability import median_interval

    values = np.linspace(0.9, 1.1, 5000)
    low, high, coverage = median_interval(values)
    assert 0.95 <= coverage < 0.96
    assert low < 1.0 < high and high - low < 0.01


def test_settle_waits_for_a_busy_thread():
    """A worker answers its round only when its threads are idle: a thread busy for 0.15 s more is waited for; one
    busy past the limit is reported."""
    import threading
    import time

    def busy(seconds):
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    waited, idle = settle_threads()
    assert idle and waited < 0.1  # nothing running: one window
    t = threading.Thread(target=busy, args=(0.15,))
    t.start()
    waited, idle = settle_threads()
    t.join()
    assert idle and waited >= 0.12
    t = threading.Thread(target=busy, args=(0.15,))
    t.start()
    waited, idle = settle_threads(limit=0.05)
    t.join()
    assert not idle and 0.05 <= waited < 0.15
