"""Latency: query vs runtime time in every runner, MLPerf LoadGen as the harness (saved logs of LoadGen 6.0.17 and
real runs with reduced settings), bench and LoadGen rows side by side, forward/backward timing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import synthetic_set, tf_preprocess
from quantship.errors import ConfigError
from quantship.evaluate.loadgen import Scenario, loadgen_row, parse_detail, parse_summary

LOGS = Path(__file__).parent / "data" / "loadgen"
MLPERF_DEFAULTS = {"min_query_count": 100, "min_duration_ms": 600000}


# ------------------------------------------------------------------------------------------- saved LoadGen logs
def test_summary_of_each_scenario_parsed():
    s = parse_summary(LOGS / "summary_ss_valid.txt")
    assert (s["Scenario"], s["Mode"], s["Result is"]) == ("SingleStream", "PerformanceOnly", "VALID")
    assert s["90.0th percentile latency (ns)"] == 23665 == s["90.00 percentile latency (ns)"]
    assert s["Min duration satisfied"] == "Yes" and s["Early stopping satisfied"] == "Yes"
    assert s["QPS w/ loadgen overhead"] == 39276.03 and s["min_duration (ms)"] == 2000 and s["min_query_count"] == 100
    assert s["Early Stopping Result"][0] == "Processed at least 64 queries (78554)."
    assert (s["warnings"], s["errors"]) == (1, 0)
    percentiles = [s[f"{p} percentile latency (ns)"] for p in ("50.00", "90.00", "95.00", "97.00", "99.00", "99.90")]
    assert all(isinstance(v, int) for v in percentiles) and percentiles == sorted(percentiles)

    m = parse_summary(LOGS / "summary_ms_valid.txt")
    assert m["Scenario"] == "MultiStream" and m["99.0th percentile latency (ns)"] == 256442
    assert m["samples_per_query"] == 8 and "QPS w/ loadgen overhead" not in m and m["Per-query latency"] == []
    assert (m["warnings"], m["errors"]) == (0, 0)

    o = parse_summary(LOGS / "summary_offline_valid.txt")
    assert o["Scenario"] == "Offline" and o["Samples per second"] == 48597.7 and o["min_query_count"] == 1


def test_invalid_summaries_say_why():
    a = parse_summary(LOGS / "summary_ss_invalid_duration.txt")
    assert a["Result is"] == "INVALID" and a["Min duration satisfied"] == "NO" and a["errors"] == 1
    assert a["Recommendations"] == ["Decrease the expected latency so the loadgen pre-generates more queries."]
    b = parse_summary(LOGS / "summary_ss_invalid_queries.txt")
    assert b["Min queries satisfied"] == "NO"
    assert b["Recommendations"] == ["The test exited early, before enough queries were issued."]
    c = parse_summary(LOGS / "summary_ss_invalid_earlystop.txt")
    assert c["Early stopping satisfied"] == "NO" and c["Recommendations"] == []
    assert c["Early Stopping Result"] == [
        "Only processed 31 queries.",
        "Need to process at least 64 queries for early stopping.",
    ]


def test_row_from_detail_log():
    d = parse_detail(LOGS / "detail_ss_valid.txt")
    assert d["result_validity"] == "VALID" and d["result_query_count"] == 78554 and d["_errors"] == []
    row = loadgen_row(d, MLPERF_DEFAULTS)
    assert row["loadgen_scenario"] == "singlestream" and row["loadgen_valid"] and row["loadgen_queries"] == 78554
    assert row["latency_ms_p90"] == pytest.approx(0.023665) and row["latency_ms_p99_9"] == pytest.approx(0.084916)
    assert row["latency_ms_min"] <= row["latency_ms_p50"] <= row["latency_ms_p90"] <= row["latency_ms_max"]
    # 2 s and 100 queries are below MLPerf's 600 s: valid only under reduced settings.
    assert row["loadgen_reduced"] and row["validity"].startswith("VALID only under reduced settings")
    assert "min_duration 2 s < 600 s" in row["validity"] and "min_query_count" not in row["validity"]
    full = loadgen_row(d, {"min_query_count": 100, "min_duration_ms": 2000})
    assert full["validity"] == "VALID" and not full["loadgen_reduced"]

    bad = loadgen_row(parse_detail(LOGS / "detail_ss_invalid_duration.txt"), MLPERF_DEFAULTS)
    assert not bad["loadgen_valid"] and bad["validity"].startswith("INVALID (min duration not met")
    assert "Max test duration reached" in bad["validity"] and bad["loadgen_errors"] == 1


def test_schedule_that_cannot_fit_is_refused():
    from quantship.evaluate.loadgen import LoadgenSettings, _check_schedule_memory

    # 1 us per query under MLPerf's 600 s: LoadGen would pre-generate 1.2 G queries (hundreds of GiB).
    with pytest.raises(ConfigError, match="lower --min-seconds"):
        _check_schedule_memory(LoadgenSettings(Scenario.SINGLESTREAM, expected_latency_ms=0.001), 600_000)
    _check_schedule_memory(LoadgenSettings(Scenario.SINGLESTREAM, expected_latency_ms=5.0), 600_000)


def test_scenario_names():
    assert Scenario.parse("SingleStream") is Scenario.SINGLESTREAM and Scenario.parse("multi-stream").value == (
        "multistream"
    )
    with pytest.raises(ConfigError, match="unknown LoadGen scenario 'server'"):
        Scenario.parse("server")


# ------------------------------------------------------------------------------------------- real runs
@pytest.fixture(scope="module")
def tiny_files(trained_tiny, tmp_path_factory):
    """The tiny model as tflite-fp32, tflite-int8 (int8 I/O) and onnx-fp32."""
    from quantship.config import IODType, Precision
    from quantship.convert.onnx import keras_to_onnx
    from quantship.convert.tflite import TfliteConverter, TfliteSpec, convert_to_tflite

    model, _ = trained_tiny
    calib = tf_preprocess(synthetic_set(4, seed=3)[0])
    out = tmp_path_factory.mktemp("bench")
    files = {}
    with TfliteConverter(model, out / "convert.log") as conv:
        for name, spec in (
            ("tflite-fp32", TfliteSpec(Precision.FP32)),
            ("tflite-int8", TfliteSpec(Precision.INT8, IODType.INT8)),
        ):
            feed = (lambda: [calib[i : i + 4] for i in range(0, len(calib), 4)]) if spec.needs_calibration else None
            files[name] = convert_to_tflite(conv, spec, out / f"tiny-{name}.tflite", feed).path
    proto = keras_to_onnx(model, log_path=out / "onnx.log")
    files["onnx-fp32"] = out / "tiny-onnx-fp32.onnx"
    files["onnx-fp32"].write_bytes(proto.SerializeToString())
    return files


@pytest.mark.slow
def test_query_time_wraps_runtime_time_and_conversion(tiny_files):
    from quantship.evaluate.latency import native_feed
    from quantship.runtime.registry import make_runner
    from quantship.runtime.tflite import TfliteRunner

    x = np.random.default_rng(0).uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
    with TfliteRunner(tiny_files["tflite-int8"], num_threads=1) as r:
        (meta,) = r.input_metadata()
        assert meta.quantized and meta.dtype == np.int8
        raw = native_feed(r, {meta.name: x})
        assert raw[meta.name].dtype == np.int8
        for feed, is_raw in ((x, False), (raw, True)):
            for _ in range(5):
                r.infer(feed, raw=is_raw)
                assert 0 < r.last_inference_time <= r.last_query_time < 1.0
        # The raw call returns what the float call returns before dequantization.
        float_out = next(iter(r.infer(x).values()))
        raw_out = next(iter(r.infer(raw, raw=True).values()))
        assert raw_out.dtype == np.int8 and float_out.dtype == np.float32
    with make_runner(str(tiny_files["onnx-fp32"])) as r:
        r.infer(x)
        assert 0 < r.last_inference_time <= r.last_query_time


def _lg(cfg_kw, tmp_path, name):
    from quantship.evaluate.bench import BenchConfig, bench

    (row,) = bench(
        [
            BenchConfig(
                str(cfg_kw.pop("artifact")),
                target=name,
                threads=1,
                warmup_seconds=0.1,
                loadgen_dir=str(tmp_path / f"{name}-{cfg_kw.get('loadgen')}"),
                **cfg_kw,
            )
        ]
    )
    return row


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["singlestream", "multistream", "offline"])
def test_each_loadgen_scenario_runs(tiny_files, tmp_path, scenario):
    # MultiStream's early stopping needs 662 queries; the others 64 (SingleStream) or none (Offline).
    queries = 700 if scenario == "multistream" else 100
    row = _lg(
        dict(
            artifact=tiny_files["tflite-int8"], loadgen=scenario, min_queries=queries, min_seconds=0.5, batch_sizes=(4,)
        ),
        tmp_path,
        "tflite-int8",
    )
    folder = Path(row["loadgen_log_dir"])
    assert folder == tmp_path / f"tflite-int8-{scenario}"
    summary = parse_summary(folder / "mlperf_log_summary.txt")
    assert summary["Scenario"] == Scenario.parse(scenario).loadgen_name
    assert summary["Result is"] == "VALID" and row["loadgen_valid"], row["validity"]
    assert row["validity"].startswith("VALID only under reduced settings") and row["loadgen_reduced"]
    assert row["loadgen_default_min_duration_ms"] == 600000  # MLPerf's rules, from LoadGen's own mlperf.conf
    assert row["harness"] == "loadgen" and row["inputs"] == "float" and row["loadgen_errors"] == 0
    assert summary["min_duration (ms)"] == 500 and row["loadgen_min_duration_ms"] == 500
    if scenario == "offline":
        assert row["loadgen_queries"] == 1 and row["loadgen_samples"] == summary["samples_per_query"] > 0
        assert row["throughput_ips_b4"] == pytest.approx(summary["Samples per second"], rel=1e-6)
        assert row["iterations"] == -(-row["loadgen_samples"] // 4)  # the SUT ran batches of 4
    else:
        spq = 8 if scenario == "multistream" else 1
        headline = "99.0th" if scenario == "multistream" else "90.0th"
        assert row["loadgen_queries"] >= queries and row["loadgen_samples"] == spq * row["loadgen_queries"]
        assert row["iterations"] == row["loadgen_queries"]  # one runner call per query
        assert row["latency_ms_p50"] == pytest.approx(summary["50.00 percentile latency (ns)"] / 1e6)
        key = "latency_ms_p99" if spq == 8 else "latency_ms_p90"
        assert row[key] == pytest.approx(summary[f"{headline} percentile latency (ns)"] / 1e6)
        assert row["latency_ms_min"] <= row["latency_ms_p50"] <= row["latency_ms_p90"] <= row["latency_ms_p99"]
        # The runtime call happens inside each query LoadGen times.
        assert 0 < row["runtime_ms_p50"] <= row["latency_ms_p50"]


@pytest.mark.slow
def test_bench_and_loadgen_rows_consistent(tiny_files, tmp_path):
    from quantship.evaluate.bench import BenchConfig, bench

    path = str(tiny_files["onnx-fp32"])
    common = dict(target="onnx-fp32", threads=1, warmup_seconds=0.1, min_queries=300, min_seconds=0.5)
    plain, under_lg = bench(
        [
            BenchConfig(path, **common),
            BenchConfig(path, loadgen="singlestream", loadgen_dir=str(tmp_path / "lg"), **common),
        ]
    )
    assert (plain["harness"], under_lg["harness"]) == ("bench", "loadgen")
    for row in (plain, under_lg):
        assert row["iterations"] >= 300 and row["inputs"] == "float" and row["input_conversion_ms"] is None
        assert 0 < row["runtime_ms_p50"] <= row["latency_ms_p50"] <= row["latency_ms_p90"] <= row["latency_ms_p99"]
        assert row["throughput_ips_b1"] > 0 and row["latency_batch"] == 1
    # Same runner call on the same sample set: the medians agree up to LoadGen's bookkeeping and this machine's
    # noise (a loose bound; benchmarks/latency_parity.py measures the agreement properly).
    assert 0.33 < under_lg["latency_ms_p50"] / plain["latency_ms_p50"] < 3


@pytest.mark.slow
def test_raw_inputs_leave_out_quantization(tiny_files):
    from quantship.evaluate.bench import BenchConfig, bench

    path = str(tiny_files["tflite-int8"])
    common = dict(threads=1, warmup_seconds=0.1, min_queries=200, min_seconds=0.2)
    as_float, raw = bench([BenchConfig(path, **common), BenchConfig(path, raw_inputs=True, **common)])
    assert (as_float["inputs"], raw["inputs"]) == ("float", "raw")
    assert as_float["input_conversion_ms"] > 0  # int8 input: the runner quantizes float samples in each query
    for row in (as_float, raw):
        assert 0 < row["runtime_ms_p50"] <= row["latency_ms_p50"]


@pytest.mark.slow
def test_bench_cli_loadgen_and_bad_input(tiny_files, tmp_path, capfd):
    from quantship.cli import main

    out = tmp_path / "out"
    capfd.readouterr()
    code = main(
        [
            "bench",
            "--artifact",
            str(tiny_files["tflite-fp32"]),
            "--loadgen",
            "singlestream",
            "--min-queries",
            "100",
            "--min-seconds",
            "0.3",
            "--warmup",
            "0.1",
            "--threads",
            "1",
            "--out",
            str(out),
        ]
    )
    res = capfd.readouterr()
    assert code == 0, res.err
    (row,) = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]
    assert row["loadgen_scenario"] == "singlestream" and row["loadgen_valid"]
    assert "VALID only under reduced settings" in res.out
    # LoadGen's early-stopping estimate, in the row and in the console table.
    assert row["loadgen_early_stopping_ms"] >= row["latency_ms_p90"] * 0.5 and "early-stopping ms" in res.out
    assert (out / "loadgen" / "tiny-tflite-fp32-singlestream" / "mlperf_log_summary.txt").is_file()

    for argv, message in (
        (["--artifact", str(tiny_files["tflite-fp32"]), "--loadgen", "server"], "unknown LoadGen scenario 'server'"),
        (["--artifact", str(tiny_files["tflite-fp32"]), "--forward-backward"], "--forward-backward times a Keras"),
        (["--model", "ssd300", "--forward-backward"], "ssd300 is a detection model"),
        (["--model", "mobilenet_v2", "--per-layer"], "--per-layer goes with --forward-backward"),
    ):
        code = main(["bench", *argv, "--out", str(tmp_path / "bad")])
        err = capfd.readouterr().err
        assert code == 2 and message in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def _vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_a_round_ends_with_the_runtime_threads_idle(tiny_files):
    """ONNX Runtime's pool (2 threads) spins for tens of ms after a call; the worker answers its round only when
    it has stopped, so the next configuration's round has the cores to itself (before: ~45 ms of one core taken
    from it, which moved int8/fp32 of MobileNetV2 from 0.66x to 0.82x)."""
    import time

    from quantship.evaluate.bench import BenchConfig, ConfigSession

    session = ConfigSession(BenchConfig(tiny_files["onnx-fp32"], threads=2, warmup_seconds=0.05))
    session.start()
    try:
        for _ in range(3):
            session.round(20)
            before = time.process_time()
            time.sleep(0.1)
            assert time.process_time() - before < 0.005  # nothing of this process ran meanwhile
        assert session.finish()["unsettled_rounds"] == 0
    finally:
        session.close()


@pytest.mark.slow
def test_interleaved_bench_through_the_cli(tiny_files, tmp_path, capsys):
    import shutil

    from quantship.cli import main

    copy = tmp_path / "copy-fp32.tflite"
    shutil.copy(tiny_files["tflite-fp32"], copy)
    ballast = np.ones(300 << 17)  # 300 MB touched here: no worker may report this process's memory as its own
    assert ballast[-1] == 1 and _vm_hwm_mb() > 300
    out = tmp_path / "out"
    files = [tiny_files["tflite-int8"], tiny_files["tflite-fp32"], copy, tiny_files["onnx-fp32"]]
    argv = ["bench", *[x for f in files for x in ("--artifact", str(f))], "--threads", "1", "--warmup", "0.05"]
    argv += ["--min-queries", "60", "--min-seconds", "0.05", "--min-rounds", "6", "--max-seconds", "4"]
    argv += ["--queries-per-round", "10", "--batch-sizes", "1,2", "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    rows = {r["target"]: r for r in map(json.loads, (out / "bench.jsonl").read_text().splitlines())}
    assert list(rows) == ["tiny-tflite-int8", "tiny-tflite-fp32", "copy-fp32", "tiny-onnx-fp32"]
    rounds = {r["rounds"] for r in rows.values()}
    assert len(rounds) == 1 and rounds.pop() >= 6  # every configuration ran in every round
    for r in rows.values():
        assert r["iterations"] == 10 * r["rounds"] and len(r["round_p50_ms"]) == r["rounds"]
        assert r["init_ms"] > 0 and r["first_inference_ms"] > 0 and r["warmup_queries"] >= 5
        assert r["latency_ms_std"] >= 0 and r["latency_cov"] == pytest.approx(
            r["latency_ms_std"] / r["latency_ms_mean"]
        )
        assert isinstance(r["stable"], bool) and (r["unstable_reason"] is None) == r["stable"]
        assert r["load_average_before"] is not None and r["load_average_after"] is not None
        assert r["throughput_ips_b1"] > 0 and r["throughput_ips_b2"] > 0 and r["throughput_batch"] in (1, 2)
        assert 0 < r["peak_rss_mb"] < 250, r["peak_rss_mb"]  # its own memory, not the parent's 300 MB+
        assert (
            "order statistics" in r["ratio_interval"]
            and r["ratio_ci_low"] <= r["ratio_to_reference"] <= r["ratio_ci_high"]
        )
        assert r["stopped_by"] in ("precision", "max-seconds")
        assert r["unsettled_rounds"] == 0 and 0 < r["settle_ms_p50"] < 500  # each round ended on idle threads
    # References: the first fp32 of the same runtime (the ONNX file is its own).
    assert [r["reference"] for r in rows.values()] == ["tiny-tflite-fp32"] * 3 + ["tiny-onnx-fp32"]
    assert rows["tiny-tflite-fp32"]["ratio_to_reference"] == 1.0
    assert 0.8 < rows["copy-fp32"]["ratio_to_reference"] < 1.25  # the same file, interleaved
    # What the runtime executes: XNNPACK takes all of the fp32 model, all but the int8 softmax; ORT's kernels.
    assert (rows["tiny-tflite-fp32"]["delegated_nodes"], rows["tiny-tflite-fp32"]["delegate_partitions"]) == (6, 1)
    assert rows["tiny-tflite-int8"]["delegated_nodes"] == rows["tiny-tflite-int8"]["total_nodes"] - 1 == 5
    assert any(k.startswith(("Conv@", "FusedConv@")) for k in rows["tiny-onnx-fp32"]["ort_kernels"])
    assert "interleaved 4 configuration(s)" in text and "order rotated every round" in text
    assert "of tiny-tflite-fp32" in text and "vs reference [95% interval]" in text
    assert "tiny-tflite-int8: LiteRT's delegate (XNNPACK) took 5 of 6 nodes" in text
    assert "tiny-onnx-fp32: ONNX Runtime executes" in text


# ------------------------------------------------------------------------------------------- forward/backward
@pytest.fixture(scope="module")
def small_cnn(tmp_path_factory) -> Path:
    """A small classifier with batch norm whose backward pass costs well above timer noise (about 0.1 GFLOP)."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((64, 64, 3), name="input")
    x = inputs
    for i, (filters, stride) in enumerate(((32, 1), (64, 2), (64, 1))):
        x = keras.layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{i}")(x)
        x = keras.layers.ReLU(name=f"relu{i}")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    out = keras.layers.Dense(10, activation="softmax", name="probs")(x)
    path = tmp_path_factory.mktemp("fb") / "small_cnn.keras"
    keras.Model(inputs, out, name="small_cnn").save(path)
    return path


@pytest.mark.slow
def test_forward_backward_rows(small_cnn, tmp_path, capsys):
    from quantship.cli import main

    out = tmp_path / "fb"
    argv = [
        "bench",
        "--model",
        str(small_cnn),
        "--forward-backward",
        "--per-layer",
        "--batch-sizes",
        "1,4",
        "--out",
        str(out),
    ]
    code = main([*argv, "--warmup", "0.1", "--min-queries", "20", "--min-seconds", "0.2", "--threads", "1"])
    text = capsys.readouterr().out
    assert code == 0
    rows = [json.loads(line) for line in (out / "forward_backward.jsonl").read_text().splitlines()]
    assert [r["batch"] for r in rows] == [1, 4]
    for r in rows:
        assert r["harness"] == "forward-backward" and r["iterations"] >= 20 and r["model"] == "small_cnn"
        assert 0 < r["forward_ms"] < r["total_ms"] and r["backward_ms_ci_low"] <= r["backward_ms_ci_high"]
        # A loaded machine may leave backward unresolved; what is reported is never a negative time.
        if r["backward_resolved"]:
            assert 0 < r["backward_ms_ci_low"] <= r["backward_ms"] <= r["backward_ms_ci_high"]
        else:
            assert r["backward_ms"] is None and "reaches 0" in r["backward_why"] and "not resolved [" in text
        assert r["params"] > 0 and r["device"] in ("CPU", "GPU")
        layers = r["slowest_layers"]
        assert len(layers) == 10 and r["layers_timed"] == 11  # 3 x (conv, bn, relu), gap, probs
        assert [x["forward_ms"] for x in layers] == sorted((x["forward_ms"] for x in layers), reverse=True)
        assert all(x["forward_ms"] > 0 for x in layers) and {"conv0", "conv1", "conv2"} <= {x["layer"] for x in layers}
    assert rows[1]["total_ms"] > rows[0]["total_ms"]  # four images cost more than one
    assert "forward ms" in text and "backward ms [95 % CI]" in text and "slowest layers" in text


def test_backward_is_the_paired_median_never_a_negative_time():
    """Backward from paired per-iteration times: a stall in one forward pass made the difference of the means
    negative (-8.6 ms was reported at load ~20); the median of the paired differences is not moved by it, and a
    difference whose interval reaches 0 is "not resolved", not a number."""
    from quantship.evaluate.fbtime import backward_text, forward_backward_stats

    rng = np.random.default_rng(0)
    fwd = 10 + rng.uniform(0, 0.5, 40)
    total = fwd + 2 + rng.uniform(-0.2, 0.2, 40)
    fwd[3] = 500.0  # one forward pass stalled: the difference of the means is about -10 ms
    assert total.mean() - fwd.mean() < 0
    r = forward_backward_stats(fwd, total, batch=2)
    assert r["backward_resolved"] and r["backward_why"] is None and r["iterations"] == 40
    assert 1.8 < r["backward_ms_ci_low"] <= r["backward_ms"] <= r["backward_ms_ci_high"] < 2.2
    assert r["backward_ms_ci_coverage"] >= 0.95 and r["forward_ms_per_image"] == r["forward_ms"] / 2
    assert backward_text(r).startswith(f"{r['backward_ms']:.2f} [")

    # Backward lost in the noise (forward+backward no slower than forward): not resolved, with the interval.
    noise = forward_backward_stats(fwd, 10 + rng.uniform(0, 0.5, 40), batch=1)
    assert not noise["backward_resolved"] and noise["backward_ms"] is None
    assert noise["backward_ms_ci_low"] < 0 < noise["backward_ms_ci_high"] and "reaches 0" in noise["backward_why"]
    assert backward_text(noise).startswith("not resolved [") and noise["forward_ms"] > 0 and noise["total_ms"] > 0

    # Too few iterations for a 95 % interval: not resolved either, even when every difference is positive.
    few = forward_backward_stats([10.0] * 5, [12.0] * 5, batch=1)
    assert few["backward_ms"] is None and "coverage, below 95 %" in few["backward_why"]
    with pytest.raises(ValueError, match="pair up"):
        forward_backward_stats([10.0] * 5, [12.0] * 4, batch=1)
