"""The interleaved run's host side (issue 23) with synthetic workers: order rotated every round, ratios to the
right reference, stopping rule, refusals. The workers are plain implementations of the BenchWorker protocol that
return generated timings (the protocol is the unit under test, not a runtime); real runs are in
test_bench_latency.py."""

from __future__ import annotations

import numpy as np
import pytest

from quantship.errors import ConfigError, RuntimeBackendError
from quantship.evaluate.interleave import (
    BenchWorker,
    InterleaveOptions,
    references,
    rotation,
    run_interleaved,
    stability_lines,
)
from quantship.evaluate.stability import StopRule


class Synthetic:
    """Times drawn around ``ms`` times the machine's current speed (shared, so drifts hit everyone alike)."""

    def __init__(self, target, ms, log, machine, runtime="tflite", threads=1, fail=False):
        self.target, self.artifact, self.ms = target, f"/models/{target}.tflite", ms
        self.log, self.machine, self.runtime, self.threads, self.fail = log, machine, runtime, threads, fail
        self.rng = np.random.default_rng(sum(map(ord, target)))
        self.closed = 0

    def start(self):
        if self.fail:
            raise RuntimeBackendError(f"{self.artifact}: not a loadable TFLite model")
        return dict(
            target=self.target,
            artifact=self.artifact,
            runtime=self.runtime,
            threads=self.threads,
            cores=None,
            cores_in_use=2,
            latency_batch=1,
            load_average_before=0.5,
        )

    def round(self, queries):
        self.log.append(self.target)
        self.machine["calls"] += 1
        speed = 1.0 if self.machine["calls"] < 18 else 1.6  # a speed switch after six rounds
        return list(self.ms * speed * self.rng.lognormal(0, 0.02, queries))

    def finish(self):
        return {"load_average_after": 0.5, "peak_rss_mb": 50.0}

    def close(self):
        self.closed += 1


def _workers(*spec, **kw):
    log, machine = [], {"calls": 0}
    return [Synthetic(t, ms, log, machine, **kw) for t, ms in spec], log


FAST = dict(stop=StopRule(0.03, min_rounds=12, max_seconds=30), queries_per_round=10, min_queries=10, min_seconds=0)


def test_rotation():
    assert [rotation(3, r) for r in range(4)] == [[0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 1, 2]]


def test_rounds_rotate_and_ratios_survive_a_speed_switch():
    workers, log = _workers(("m-int8", 3.0), ("m-fp32", 5.0), ("m-fp16", 4.0))
    assert all(isinstance(w, BenchWorker) for w in workers)
    run = run_interleaved(workers, InterleaveOptions(**FAST))
    assert run.rounds >= 12 and len(log) == 3 * run.rounds
    firsts = [log[3 * r] for r in range(run.rounds)]
    assert firsts[:3] == ["m-int8", "m-fp32", "m-fp16"]  # each configuration leads a round in turn
    assert all(sorted(log[3 * r : 3 * r + 3]) == ["m-fp16", "m-fp32", "m-int8"] for r in range(run.rounds))
    rows = {r["target"]: r for r in run.rows}
    assert {r["reference"] for r in run.rows} == {"m-fp32"}  # the first fp32 of the same runtime, not the first
    assert rows["m-int8"]["ratio_ci_low"] <= 0.6 <= rows["m-int8"]["ratio_ci_high"]
    assert rows["m-int8"]["ratio_half_width"] <= 0.03 and run.stopped_by.value == "precision"
    assert rows["m-fp32"]["ratio_to_reference"] == 1.0 and rows["m-int8"]["rounds"] == run.rounds
    # The absolute times switched speed: flagged, with the note that the ratios still hold.
    assert all(r["stable"] is False and "two speeds" in r["unstable_reason"] for r in run.rows)
    lines = stability_lines(run.rows)
    assert len(lines) == 4 and lines[0].startswith("warning: m-int8: the benchmark seems unstable")
    assert "stays valid" in lines[-1]
    assert "stopped by precision" in run.summary(InterleaveOptions(**FAST))


def test_groups_and_named_reference():
    infos = [
        dict(target="a-fp32@1t", artifact="a.tflite", runtime="tflite", threads=1, latency_batch=1),
        dict(target="b-int8@1t", artifact="b.tflite", runtime="tflite", threads=1, latency_batch=1),
        dict(target="a-fp32@2t", artifact="a.tflite", runtime="tflite", threads=2, latency_batch=1),
        dict(target="b-int8@2t", artifact="b.tflite", runtime="tflite", threads=2, latency_batch=1),
        dict(target="c-onnx", artifact="c.onnx", runtime="onnx", threads=1, latency_batch=1),
    ]
    assert references(infos, None) == [0, 0, 2, 2, 0]  # within thread counts; onnx: no fp32 of its own runtime
    assert references(infos, "b-int8") == [1, 1, 3, 3, 1]
    assert references(infos, "b.tflite") == [1, 1, 3, 3, 1]


def test_max_seconds_ends_a_run_that_cannot_reach_the_precision():
    workers, _ = _workers(("x-fp32", 5.0), ("y", 5.0))
    opts = InterleaveOptions(**{**FAST, "stop": StopRule(0.0001, min_rounds=3, max_seconds=0.05)})
    run = run_interleaved(workers, opts)
    assert run.stopped_by.value == "max-seconds" and run.rounds >= 3
    assert "--max-seconds" in run.summary(opts)


def test_refusals():
    workers, log = _workers(("x-fp32", 5.0), ("y", 5.0))
    with pytest.raises(ConfigError, match="--reference z is none of the configurations benched"):
        run_interleaved(workers, InterleaveOptions(reference="z"))
    assert log == []
    log, machine = [], {"calls": 0}
    broken = [Synthetic("x-fp32", 5.0, log, machine, fail=True), Synthetic("y", 5.0, log, machine)]
    with pytest.raises(ConfigError, match="the reference x-fp32 .* failed to run: .*not a loadable"):
        run_interleaved(broken, InterleaveOptions(**FAST))
    assert log == []  # nothing timed
    log, machine = [], {"calls": 0}
    other = [Synthetic("x-fp32", 5.0, log, machine), Synthetic("y", 5.0, log, machine, fail=True)]
    with pytest.raises(RuntimeBackendError, match="not a loadable"):
        run_interleaved(other, InterleaveOptions(**FAST))
