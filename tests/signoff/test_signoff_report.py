"""Latency statistics, bootstrap intervals, sign-off gates, kill-and-resume, and the reports."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_PREPROCESS
from quantship.config import Gate
from quantship.errors import ConfigError
from quantship.evaluate.bench import BenchConfig, annotate, mobile_profile
from quantship.evaluate.latency import latency_stats
from quantship.signoff.plan import SignoffPlan

# ------------------------------------------------------------------------------------------ statistics


def test_latency_percentiles_match_numpy():
    ms = np.random.default_rng(3).lognormal(1.0, 0.4, 1001)
    s = latency_stats(ms)
    for p in (50, 90, 95, 99):
        assert s[f"latency_ms_p{p}"] == pytest.approx(np.percentile(ms, p))
    assert s["latency_ms_min"] == ms.min() and s["latency_ms_max"] == ms.max()
    assert s["latency_ms_mean"] == pytest.approx(ms.mean()) and s["iterations"] == 1001


def _paired(t, r):
    from quantship.evaluate.tasks import PairedSample

    t, r = np.asarray(t, float), np.asarray(r, float)
    return PairedSample("top1", t.mean(), r.mean(), t.size, per_image=(t, r))


def test_nine_agreeing_images_prove_nothing():
    """9 photos on which int8 agrees with fp32: the point value passes, but the true disagreement rate could be
    up to about 0.3, so the exact interval is wide and an interval gate is INCONCLUSIVE (the bootstrap said
    [1, 1] and PASS)."""
    from quantship.evaluate.verdicts import gate_verdict

    ones = np.ones(9)
    point = gate_verdict(Gate(relative=0.99), _paired(ones, ones))
    assert point["verdict"] == "PASS" and point["rule"] == "point" and point["interval"] == "exact"
    assert point["ci_low"] < 0.75 and point["ci_high"] > 1.0
    interval = gate_verdict(Gate(relative=0.99, decision="interval"), _paired(ones, ones))
    assert interval["verdict"] == "INCONCLUSIVE" and not interval["passed"]
    assert interval["images_to_settle"] > 9
    few = gate_verdict(Gate(relative=0.99), _paired(ones, ones), min_images=50)
    assert few["verdict"] == "INCONCLUSIVE" and few["images_to_settle"] >= 50


def test_interval_rule_passes_fails_and_settles():
    from quantship.evaluate.verdicts import gate_verdict

    rng = np.random.default_rng(0)
    ref = (rng.random(4000) < 0.75).astype(float)
    same = gate_verdict(Gate(max_drop_points=1.0, decision="interval"), _paired(ref, ref))
    assert same["verdict"] == "PASS" and same["ci_low"] > -1.0  # 4000 agreeing images: within 1 point
    worse = ref.copy()
    worse[np.flatnonzero(ref)[:400]] = 0  # 10 points lower
    bad = gate_verdict(Gate(max_drop_points=1.0, decision="interval"), _paired(worse, ref))
    assert bad["verdict"] == "FAIL" and bad["ci_high"] < -1.0 and bad["ci_low"] <= -10.0
    undecided = gate_verdict(Gate(max_drop_points=0.5, decision="interval"), _paired(ref[:200], ref[:200]))
    assert undecided["verdict"] == "INCONCLUSIVE" and undecided["images_to_settle"] > 200


# --------------------------------------------------------------------------------------------- plans


def test_plan_validation():
    base = {
        "models": ["mobilenet_0.25_128"],
        "targets": ["tflite-int8"],
        "dataset": "imagenet:/x",
        "gates": [{"metric": "top1", "relative": 0.99}],
    }
    plan = SignoffPlan.from_dict(base)
    assert plan.data == "imagenet:/x" and plan.gates[0].applies("tflite-int8")
    with pytest.raises(ConfigError, match="unknown key"):
        SignoffPlan.from_dict({**base, "tagrets": []})
    with pytest.raises(ConfigError, match="exactly one"):
        Gate(relative=0.99, max_drop_points=1.0)
    with pytest.raises(ConfigError, match="'gates' is required"):
        SignoffPlan.from_dict({**base, "gates": []})
    assert Gate(max_drop_points=0.5, targets=("tflite-*",)).applies("tflite-fp16")
    assert not Gate(max_drop_points=0.5, targets=("onnx-*",)).applies("tflite-fp16")


def _write_plan(
    path: Path,
    model: Path,
    data: Path,
    gates: list[dict],
    targets: list[str],
    limit: int = 90,
    chunk: int = 32,
    bench: bool | dict = False,  # one test runs the bench pass; the others leave it out (time)
) -> Path:
    import yaml

    mode, size, crop = (kv.split("=")[1] for kv in TINY_PREPROCESS.split(","))
    path.write_text(
        yaml.safe_dump(
            {
                "name": "test-plan",
                "dataset": f"imagenet:{data}",
                "limit": limit,
                "calibration": {"num_images": 12},
                "chunk_images": chunk,
                "models": [
                    {"name": str(model), "preprocess": {"mode": mode, "size": int(size), "crop_pct": float(crop)}}
                ],
                "targets": targets,
                "gates": gates,
                "bench": bench,
            }
        )
    )
    return path


@pytest.fixture(scope="module")
def bigger_dataset(tmp_path_factory):
    from conftest import write_synset_dataset

    return write_synset_dataset(tmp_path_factory.mktemp("signoff-data"), 40, seed=9)


def _signoff(plan: Path, out: Path, capfd) -> subprocess.CompletedProcess:
    """``quantship signoff PLAN --out OUT`` through ``main()`` in this process (a fresh interpreter per run would
    import TensorFlow again), its output captured by ``capfd``."""
    from quantship.cli import main

    capfd.readouterr()
    code = main(["signoff", str(plan), "--out", str(out)])
    captured = capfd.readouterr()
    return subprocess.CompletedProcess(["quantship", "signoff"], code, captured.out, captured.err)


@pytest.mark.slow
def test_failing_gate_fails_the_run(trained_tiny, bigger_dataset, tmp_path, capfd):
    _, model = trained_tiny
    plan = _write_plan(
        tmp_path / "plan.yaml",
        model,
        bigger_dataset,
        [{"metric": "top1", "relative": 0.9}, {"metric": "top1", "relative": 1.01, "targets": ["tflite-fp16"]}],
        ["tflite-fp32", "tflite-fp16"],
    )
    res = _signoff(plan, tmp_path / "out", capfd)
    assert res.returncode == 1, res.stdout + res.stderr
    verdicts = [json.loads(line) for line in (tmp_path / "out" / "verdicts.jsonl").read_text().splitlines()]
    assert [(v["target"], v["gate"], v["passed"]) for v in verdicts] == [
        ("tflite-fp32", "top1 >= 0.9 x reference", True),
        ("tflite-fp16", "top1 >= 0.9 x reference", True),
        ("tflite-fp16", "top1 >= 1.01 x reference", False),
    ]
    assert all(v["ci_low"] <= v["value"] <= v["ci_high"] for v in verdicts)
    assert "FAIL: 2 of 3 gates passed" in res.stdout
    # Why (issue 28): only the failing verdict gets a line, from the per-layer comparison, naming what passed.
    why = verdicts[2]["why"]
    assert why.startswith("tflite-fp16 parts from fp32 at ") and "dB" in why, why
    assert why.endswith("passes instead (same run): tflite-fp32") and "why" not in verdicts[1]
    assert f"tflite-fp16 failed top1 >= 1.01 x reference: {why}" in res.stdout


@pytest.mark.slow
def test_kill_and_resume_keeps_every_stored_result(trained_tiny, bigger_dataset, tmp_path, capfd):
    _, model = trained_tiny
    plan = _write_plan(
        tmp_path / "plan.yaml",
        model,
        bigger_dataset,
        [{"metric": "top1", "max_drop_points": 5}],
        ["tflite-fp32", "tflite-int8", "onnx-fp32"],
        limit=96,
        chunk=8,
    )
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "quantship", "signoff", str(plan), "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        chunks = list((out / "state").glob("*/chunk-*.npz")) if (out / "state").exists() else []
        rows = (out / "signoff.jsonl").read_text().count("\n") if (out / "signoff.jsonl").exists() else 0
        if rows >= 1 and len(chunks) >= 16:  # the reference finished, the next target half way
            break
        if proc.poll() is not None:
            pytest.fail("sign-off finished before it could be killed")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (out / "state").glob("*/chunk-*.npz")}
    rows_before = (out / "signoff.jsonl").read_text()
    assert before and rows_before

    res = _signoff(plan, out, capfd)
    assert res.returncode == 0, res.stderr
    for p, (mtime, data) in before.items():
        assert p.stat().st_mtime_ns == mtime and p.read_bytes() == data, f"{p.name} was recomputed"
    text = (out / "signoff.jsonl").read_text()
    assert text.startswith(rows_before)  # stored rows untouched
    rows = [json.loads(line) for line in text.splitlines()]
    assert sorted(r["target"] for r in rows) == ["keras-fp32", "onnx-fp32", "tflite-fp32", "tflite-int8"]
    assert all(r["images"] == 96 for r in rows)
    for r in rows:
        assert len(list(Path(r["state"]).glob("chunk-*.npz"))) == 12
    # A third run recomputes nothing at all.
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "state").glob("*/chunk-*.npz")}
    assert _signoff(plan, out, capfd).returncode == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "state").glob("*/chunk-*.npz")} == mtimes
    assert (out / "signoff.jsonl").read_text() == text


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.tables = [], 0

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs).get("src", ""))
        if tag == "table":
            self.tables += 1


@pytest.mark.slow
def test_report_is_rebuilt_from_stored_results_and_holds_its_plot(trained_tiny, bigger_dataset, tmp_path, capfd):
    _, model = trained_tiny
    plan = _write_plan(
        tmp_path / "plan.yaml",
        model,
        bigger_dataset,
        [{"metric": "top1", "relative": 0.95}],
        ["tflite-fp32", "tflite-int8"],
        bench={"min_rounds": 4, "max_seconds": 3, "queries_per_round": 5},
    )
    out = tmp_path / "out"
    assert _signoff(plan, out, capfd).returncode == 0
    # The report's latency comes from the interleaved bench pass over the artifact files (Keras has none).
    bench = {r["target"]: r for r in map(json.loads, (out / "bench.jsonl").read_text().splitlines())}
    assert sorted(bench) == ["tflite-fp32", "tflite-int8"] and bench["tflite-int8"]["reference"] == "tflite-fp32"
    assert all(r["model"] == "tiny" and r["rounds"] >= 4 and r["latency_batch"] == 1 for r in bench.values())
    from quantship.evaluate.report import _chart_points, load_results

    points = {p[1]: p for p in _chart_points(load_results(out))}
    assert points["tflite-int8"][2] == bench["tflite-int8"]["latency_ms_p50"] and points["tflite-int8"][4]
    assert points["tflite-fp32"][4] is None  # the reference: no bar
    (out / "report.html").unlink()
    from quantship.cli import main

    assert main(["report", str(out)]) == 0, capfd.readouterr().err
    parser = _Images()
    page = (out / "report.html").read_text()
    parser.feed(page)
    (src,) = parser.images
    assert src.startswith("data:image/png;base64,")
    assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert parser.tables >= 2 and "tflite-int8" in page and "PASS" in page
    assert "onnxruntime" in page or "tensorflow" in page  # environment section
    assert (out / "report.md").read_text().count("| tiny |") >= 3


# ------------------------------------------------------------------------------------------------ bench


def test_bench_config_validation(tmp_path):
    with pytest.raises(ConfigError, match="no runtime runs .model.pb.: expected one of .engine, .onnx"):
        BenchConfig(str(tmp_path / "model.pb"))
    cfgs = mobile_profile(tmp_path / "m.tflite", "tflite-int8")
    assert [c.threads for c in cfgs] == [1, 2, 4]
    assert all(len(c.cores) == min(c.threads, len(os.sched_getaffinity(0))) for c in cfgs)


def test_int8_slower_than_sibling_is_flagged():
    rows = [
        {"target": "tflite-fp32", "runtime": "tflite", "threads": 2, "latency_ms_p50": 5.0},
        {"target": "tflite-int8", "runtime": "tflite", "threads": 2, "latency_ms_p50": 7.0},
        {"target": "onnx-fp32", "runtime": "onnx", "threads": 2, "latency_ms_p50": 1.0},
    ]
    out = annotate(rows)
    assert out[1]["warnings"] == ["int8 is slower than tflite-fp32 (7.00 vs 5.00 ms p50)"]
    assert "warnings" not in out[0] and "warnings" not in out[2]


@pytest.mark.slow
def test_bench_cli_on_a_tflite_file(trained_tiny, bigger_dataset, tmp_path, capfd):
    from quantship.cli import main

    _, model = trained_tiny
    capfd.readouterr()
    code = main(
        [
            "bench",
            "--model",
            str(model),
            "--preprocess",
            TINY_PREPROCESS,
            "--targets",
            "tflite-fp32,tflite-int8",
            "--data",
            f"imagenet:{bigger_dataset}",
            "--calib-images",
            "10",
            "--threads",
            "1",
            "--batch-sizes",
            "1,4",
            "--min-queries",
            "30",
            "--min-seconds",
            "0.2",
            "--warmup",
            "0.1",
            "--out",
            str(tmp_path / "b"),
        ]
    )
    assert code == 0, capfd.readouterr().err
    rows = [json.loads(line) for line in (tmp_path / "b" / "bench.jsonl").read_text().splitlines()]
    assert [r["target"] for r in rows] == ["tflite-fp32", "tflite-int8"]
    for r in rows:
        assert r["iterations"] >= 30
        assert (
            r["latency_ms_min"]
            <= r["latency_ms_p50"]
            <= r["latency_ms_p90"]
            <= r["latency_ms_p99"]
            <= r["latency_ms_max"]
        )
        assert r["throughput_ips_b1"] > 0 and r["throughput_ips_b4"] > 0
        assert r["init_ms"] > 0 and r["peak_rss_mb"] > 10 and r["file_size_bytes"] > 0


# ------------------------------------------------------------------------------ stored results are exact


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "signoff.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_replaced_model_file_is_evaluated_again(trained_tiny, bigger_dataset, tmp_path, capfd):
    """Same path, other content: the stored rows must not be reused (they were: a PASS with the old numbers)."""
    import shutil

    from conftest import _tiny_model

    _, trained = trained_tiny
    model = tmp_path / "model.keras"
    shutil.copy(trained, model)
    plan = _write_plan(
        tmp_path / "plan.yaml", model, bigger_dataset, [{"metric": "top1", "relative": 0.9}], ["tflite-fp32"], limit=30
    )
    out = tmp_path / "out"
    assert _signoff(plan, out, capfd).returncode == 0
    first = {r["target"]: r for r in _rows(out)}
    other = _tiny_model()  # another model at the same path: it answers class 2 for every image
    k, b = other.get_layer("logits").get_weights()
    other.get_layer("logits").set_weights([k * 0, np.array([0.0, 0.0, 10.0], np.float32)])
    other.save(model)
    _signoff(plan, out, capfd)
    plan_keys = json.loads((out / "plan.json").read_text())["unit_keys"]
    current = {r["target"]: r for r in _rows(out) if r["unit_key"] in plan_keys}
    assert set(current) == {"keras-fp32", "tflite-fp32"}
    for target, row in current.items():
        assert row["unit_key"] != first[target]["unit_key"]
    assert current["keras-fp32"]["top1"] != first["keras-fp32"]["top1"]
    assert current["tflite-fp32"]["top1"] == current["keras-fp32"]["top1"]  # the artifact was rebuilt too


@pytest.mark.slow
def test_resume_only_reuses_exactly_matching_chunks(trained_tiny, bigger_dataset, tmp_path, capfd):
    """A corrupt chunk is discarded and recomputed alone; other chunking is another key (no double counting);
    targets dropped from the plan leave the verdicts and the report's tables, listed as not in this plan."""
    _, model = trained_tiny
    gates = [{"metric": "top1", "max_drop_points": 5}]
    plan = _write_plan(
        tmp_path / "plan.yaml", model, bigger_dataset, gates, ["tflite-fp32", "tflite-fp16"], limit=40, chunk=16
    )
    out = tmp_path / "out"
    assert _signoff(plan, out, capfd).returncode == 0
    chunks = sorted((out / "state").glob("*tflite-fp32*/chunk-*.npz"))
    assert len(chunks) == 3
    good = {p: p.stat().st_mtime_ns for p in (out / "state").glob("*/chunk-*.npz") if p != chunks[1]}
    chunks[1].write_bytes(chunks[1].read_bytes()[:100])  # truncated
    rows = {r["unit_key"]: r for r in _rows(out)}
    res = _signoff(plan, out, capfd)
    assert res.returncode == 0 and "discarding the stored chunk" in res.stdout, res.stdout + res.stderr
    assert {p: p.stat().st_mtime_ns for p in good} == good and chunks[1].stat().st_size > 100

    def numbers(rows):
        return {k: {f: v for f, v in r.items() if f != "latency_ms"} for k, r in rows.items()}

    assert numbers({r["unit_key"]: r for r in _rows(out)}) == numbers(rows)  # the same rows, the same numbers

    plan = _write_plan(tmp_path / "plan2.yaml", model, bigger_dataset, gates, ["tflite-fp32"], limit=40, chunk=24)
    assert _signoff(plan, out, capfd).returncode == 0
    keys = json.loads((out / "plan.json").read_text())["unit_keys"]
    current = [r for r in _rows(out) if r["unit_key"] in keys]
    assert sorted(r["target"] for r in current) == ["keras-fp32", "tflite-fp32"]
    assert all(r["images"] == 40 for r in current)  # not 40 + stored chunks of the other chunking
    verdicts = [json.loads(line) for line in (out / "verdicts.jsonl").read_text().splitlines()]
    assert [v["target"] for v in verdicts] == ["tflite-fp32"]
    report = (out / "report.md").read_text()
    accuracy, other = report.split("## Stored results not in this plan")
    assert "tflite-fp16" not in accuracy and "tflite-fp16" in other


def test_a_second_run_on_the_same_folder_is_refused(tmp_path):
    from quantship.fileio import FolderLock

    plan = tmp_path / "plan.yaml"
    plan.write_text(
        "name: p\ndataset: imagenet:/nowhere\nmodels: [{name: mobilenet_v2, weights: random}]\n"
        "targets: [tflite-fp32]\ngates: [{metric: top1, relative: 0.9}]\n"
    )
    with FolderLock(tmp_path / "out", "a test holding the folder"):  # another process holds it: a subprocess
        res = subprocess.run(
            [sys.executable, "-m", "quantship", "signoff", str(plan), "--out", str(tmp_path / "out")],
            capture_output=True,
            text=True,
        )
    assert res.returncode == 2
    assert f"{tmp_path / 'out'} is in use by another run (PID {os.getpid()}: a test holding the folder)" in res.stderr
    assert "Traceback" not in res.stderr
    with FolderLock(tmp_path / "out"):  # released when the holder is done
        pass


@pytest.fixture(scope="module")
def fails_int16x8(tmp_path_factory):
    """A classifier whose int16x8 TFLite model converts but cannot run: a depthwise conv with ReLU6 whose output
    is tiny, so 6 / output scale overflows int32 ("DEPTHWISE_CONV_2D failed to prepare", as mobilenet_0.25_128)."""
    import keras

    keras.utils.set_random_seed(4)
    inputs = keras.Input((32, 32, 3), name="input")
    x = keras.layers.DepthwiseConv2D(3, padding="same", activation="relu6", name="dw")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(3, activation="softmax", name="fc")(x)
    model = keras.Model(inputs, out)
    k, b = model.get_layer("dw").get_weights()
    model.get_layer("dw").set_weights([k * 1e-7, b * 0])
    path = tmp_path_factory.mktemp("i16") / "tiny_dw.keras"
    model.save(path)
    return path


@pytest.mark.slow
def test_a_target_that_cannot_run_gets_a_row_and_the_others_are_evaluated(fails_int16x8, synset_dataset, tmp_path):
    from quantship.cli import main

    out = tmp_path / "out"
    data = f"imagenet:{synset_dataset}"
    targets = "keras-fp32,tflite-int16x8,tflite-fp32"
    common = ["--preprocess", TINY_PREPROCESS, "--calib-images", "6", "--limit", "12", "--out", str(out)]
    code = main(["eval", "--model", str(fails_int16x8), "--data", data, "--targets", targets, *common])
    assert code == 1
    rows = {r["target"]: r for r in (json.loads(line) for line in (out / "results.jsonl").read_text().splitlines())}
    assert rows["tflite-int16x8"]["status"] == "failed" and "failed to prepare" in rows["tflite-int16x8"]["error"]
    assert rows["keras-fp32"]["status"] == rows["tflite-fp32"]["status"] == "ok"
    assert rows["tflite-fp32"]["images"] == 12 and rows["tflite-fp32"]["agreement_top1"] == 1.0
    assert not list((out / "artifacts").glob("*int16x8*"))  # no half-built file or manifest left behind
    assert "FAILED tflite-int16x8" in (out / "results.md").read_text()


def test_chart_labels_do_not_overlap_and_the_log_axis_reads():
    """Twelve targets crowded at one accuracy (as in the demo): every label inside the axes, clear of every
    other label and of the title; the log axis labels only its major ticks, as plain numbers."""
    from quantship.evaluate.charts import _overlap, _pyplot, accuracy_latency_figure

    lat = [13.8, 19.0, 21.9, 45.5, 50.0, 57.7, 61.4, 62.5, 64.7, 65.6, 669.0, 30.0]
    points = [("m", f"target-number-{i}", x, 0.75) for i, x in enumerate(lat)]
    fig, ax, boxes = accuracy_latency_figure(points)
    assert len(boxes) == len(points)
    assert not [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1 :] if _overlap(a, b)]
    inside = ax.get_window_extent(fig.canvas.get_renderer())
    assert all(inside.x0 <= b[0] and b[2] <= inside.x1 and inside.y0 <= b[1] and b[3] <= inside.y1 for b in boxes)
    title = ax.title.get_window_extent(fig.canvas.get_renderer())
    assert not any(_overlap(b, (title.x0, title.y0, title.x1, title.y1)) for b in boxes)
    major = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    minor = [t.get_text() for t in ax.get_xticklabels(minor=True) if t.get_text()]
    assert minor == [] and "10" in major and "50" in major and all("^" not in m for m in major)
    _pyplot().close(fig)


def test_chart_draws_ratio_intervals_as_error_bars():
    from quantship.evaluate.charts import _pyplot, accuracy_latency_figure
    from quantship.evaluate.report import _chart_points

    bench = [
        {"target": "m-fp32", "model": "m", "latency_ms_p50": 10.0, "ratio_to_reference": 1.0, "reference": "m-fp32"},
        {
            "target": "m-int8",
            "model": "m",
            "latency_ms_p50": 6.0,
            "reference": "m-fp32",
            "ratio_to_reference": 0.6,
            "ratio_ci_low": 0.57,
            "ratio_ci_high": 0.63,
        },
    ]
    rows = [{"model": "m", "target": t, "top1": 0.7} for t in ("m-fp32", "m-int8")]
    points = _chart_points({"bench": bench, "rows": rows})
    assert points[0][4] is None and points[1][4] == pytest.approx((5.7, 6.3))
    fig, ax, _ = accuracy_latency_figure(points)
    (bars,) = [c for c in ax.containers if type(c).__name__ == "ErrorbarContainer"]
    (segments,) = [s.get_segments() for s in bars.lines[2]]
    assert [tuple(np.round(seg[:, 0], 6)) for seg in segments] == [(5.7, 6.3)]  # one bar, the int8 point's
    assert "95 % interval" in ax.get_xlabel()
    _pyplot().close(fig)
