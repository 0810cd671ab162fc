"""Label-free gates (agreement with the reference, distances between output distributions), ``images:`` as
evaluation data, and underpowered PASS verdicts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_PREPROCESS
from quantship.config import Gate
from quantship.errors import ConfigError
from quantship.evaluate.tasks import (
    ClassificationTask,
    PairedSample,
    as_probabilities,
    check_gate,
    kl_divergence,
    l1_distance,
)
from quantship.evaluate.verdicts import gate_verdict, overall_verdict

# ------------------------------------------------------------------------------------------- metrics


class _Batch:
    def __init__(self, keys, labels=None):
        self.keys, self.labels = keys, labels if labels is not None else [None] * len(keys)


def test_distances_by_hand():
    p = np.array([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    q = np.array([[0.5, 0.25, 0.25], [0.0, 1.0, 0.0]])
    assert l1_distance(q, p).tolist() == [0.5, 2.0]
    kl = kl_divergence(p, q)
    assert kl[0] == pytest.approx(0.5 * np.log(0.5 / 0.25), rel=1e-4)  # the exact zero in p costs ~nothing
    # An exact zero in the target (int8 softmax) is clipped at the stated epsilon, not infinite.
    assert np.isfinite(kl[1]) and kl[1] == pytest.approx(np.log(1 / 1e-6), rel=1e-3)
    assert (kl_divergence(p, p) < 1e-9).all()
    logits = np.array([[2.0, -1.0, 0.5]])
    assert as_probabilities(logits).sum() == pytest.approx(1.0)  # logits -> softmax
    int8_like = np.array([[0.75, 0.0, 0.2]])  # a quantized softmax: kept as given
    assert as_probabilities(int8_like).tolist() == int8_like.tolist()


def test_agreement_and_distance_per_image_without_labels():
    task = ClassificationTask(labelled=False)
    keys = ["a", "b", "c", "d"]
    ref_scores = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    tgt_scores = np.array([[0.6, 0.3, 0.1], [0.5, 0.4, 0.1], [0.2, 0.3, 0.5], [np.nan, 0.3, 0.1]])
    ref, tgt = task.score(ref_scores, _Batch(keys)), task.score(tgt_scores, _Batch(keys))
    assert "correct1" not in tgt and task.evaluate(tgt, keys) == {}
    agree = task.agreement(tgt, ref)
    # b flips (0 vs 1), d's NaN output predicts nothing: 2 of 4 agree; top-5 of 3 classes holds every class
    # but the NaN image's.
    assert agree["agreement_top1"] == 0.5 and agree["agreement_top5"] == 0.75
    expected_l1 = np.mean([0.2, 0.8, 0.0, 1.0])  # the NaN image's vector is zeros: L1 = sum of the reference
    assert agree["mean_l1"] == pytest.approx(expected_l1, abs=2e-3)  # float16 storage
    paired = task.paired("agreement_top1", tgt, ref, keys)
    assert paired.binary and paired.reference == 1.0 and paired.values.tolist() == [1, 0, 1, 0]
    with pytest.raises(ConfigError, match="needs labels"):
        task.paired("top1", tgt, ref, keys)


# ------------------------------------------------------------------------------------------- gates


def test_gate_checks_name_direction_range_and_labels():
    assert check_gate(Gate.parse("MAP>=0.9"), "detection").metric == "mAP"
    assert check_gate(Gate.parse("mean_l1<=0.3"), "classification", labelled=False).maximum == 0.3
    assert Gate.parse("agreement_top1-drop<=1") == Gate(metric="agreement_top1", max_drop_points=1.0)
    for gate, task, labelled, message in (
        (Gate(metric="top1", relative=0.9), "classification", False, "needs labels"),
        (Gate(metric="pseudo_map", relative=0.9), "classification", True, "pseudo_map is a detection metric"),
        (Gate(metric="agreement_top1", maximum=0.3), "classification", True, "must be high"),
        (Gate(metric="mean_kl", minimum=0.1), "classification", True, "gate it with max"),
        (Gate(metric="mean_l1", maximum=2.5), "classification", True, r"lies in \[0, 2\]"),
        (Gate(metric="agreement_top5", relative=1.1), "classification", True, "at most 1"),
    ):
        with pytest.raises(ConfigError, match=message):
            check_gate(gate, task, labelled)


def test_nine_agreeing_images_pass_underpowered_and_the_headline_says_so():
    """The newcomer's 9 photos: every top-1 agrees, so the point rule passes, but the exact interval of the
    agreement rate reaches down to 0.66: PASS stays (MLPerf's rule) and is marked underpowered with the images
    that would settle it; 400 agreeing images settle it and the mark goes."""
    gate = Gate(metric="agreement_top1", relative=0.99)
    v = gate_verdict(gate, PairedSample("agreement_top1", 1.0, 1.0, 9, values=np.ones(9), binary=True))
    assert v["verdict"] == "PASS" and v["underpowered"] and v["unit"] == "ratio"
    assert v["ci_low"] == pytest.approx(0.025 ** (1 / 9), rel=1e-6)  # Clopper-Pearson with 0 of 9 disagreeing
    assert v["images_to_settle"] == 368  # 0.975 ** (1 / N) >= 0.99 first at N = 368
    settled = gate_verdict(gate, PairedSample("agreement_top1", 1.0, 1.0, 368, values=np.ones(368), binary=True))
    assert settled["verdict"] == "PASS" and not settled["underpowered"] and settled["images_to_settle"] is None
    interval = gate_verdict(
        Gate(metric="agreement_top1", relative=0.99, decision="interval"),
        PairedSample("agreement_top1", 1.0, 1.0, 9, values=np.ones(9), binary=True),
    )
    assert interval["verdict"] == "INCONCLUSIVE" and not interval["underpowered"]
    overall = overall_verdict([v, settled])
    assert overall.headline == "PASS, but 1 of 2 gates are underpowered (368 images needed)"
    assert overall.css == "underpowered" and overall.exit_code() == 0 and overall.exit_code(strict=True) == 1
    assert overall_verdict([settled]).headline == "PASS: 1 of 1 gates passed"
    assert overall_verdict([interval]).exit_code() == 1


def test_distance_gate_is_judged_lower_is_better():
    rng = np.random.default_rng(0)
    d = rng.uniform(0.0, 0.1, 400)
    ok = gate_verdict(Gate(metric="mean_l1", maximum=0.2), PairedSample("mean_l1", d.mean(), 0.0, 400, values=d))
    assert ok["verdict"] == "PASS" and not ok["underpowered"] and ok["ci_high"] < 0.2 and ok["unit"] == "fraction"
    bad = gate_verdict(Gate(metric="mean_l1", maximum=0.04), PairedSample("mean_l1", d.mean(), 0.0, 400, values=d))
    assert bad["verdict"] == "FAIL" and bad["ci_low"] > 0.04
    limit = d.mean() + 0.002  # the point clears, the interval (about +-0.003) does not
    close = gate_verdict(Gate(metric="mean_l1", maximum=limit), PairedSample("mean_l1", d.mean(), 0.0, 400, values=d))
    assert close["verdict"] == "PASS" and close["underpowered"]
    assert close["images_to_settle"] > 400


# ------------------------------------------------------------------------------- end to end, images:


@pytest.fixture(scope="module")
def unlabelled_folder(tmp_path_factory):
    from conftest import write_synset_dataset

    return write_synset_dataset(tmp_path_factory.mktemp("unlabelled"), 6, seed=4)


@pytest.mark.slow
def test_signoff_on_unlabelled_images_with_label_free_gates(trained_tiny, unlabelled_folder, tmp_path, capsys):
    """A sign-off on a folder without labels: agreement and distance gates judged, rows carry agreement and
    mean L1 (no top-1), the underpowered PASS exits 0 and fails under --strict."""
    import yaml

    from quantship.cli import main

    _, model = trained_tiny
    mode, size, crop = (kv.split("=")[1] for kv in TINY_PREPROCESS.split(","))
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        yaml.safe_dump(
            {
                "name": "label-free",
                "dataset": f"images:{unlabelled_folder}",
                "calibration": {"num_images": 8},
                "models": [
                    {"name": str(model), "preprocess": {"mode": mode, "size": int(size), "crop_pct": float(crop)}}
                ],
                "targets": ["tflite-int8"],
                "gates": [
                    {"metric": "agreement_top1", "relative": 0.9},
                    {"metric": "mean_l1", "max": 0.1},
                ],
                "bench": False,  # latency is not what this test is about
            }
        )
    )
    out = tmp_path / "out"
    code = main(["signoff", str(plan), "--out", str(out), "-q"])
    text = capsys.readouterr().out
    from quantship.evaluate.report import load_results

    rows = load_results(out)["rows"]  # the unit rows joined with agreement.jsonl
    verdicts = [json.loads(line) for line in (out / "verdicts.jsonl").read_text().splitlines()]
    int8 = next(r for r in rows if r["target"] == "tflite-int8")
    ref = next(r for r in rows if r["target"] == "keras-fp32")
    assert "top1" not in int8 and 0 <= int8["agreement_top1"] <= 1 and 0 <= int8["mean_l1"] <= 2
    assert ref["agreement_top1"] == 1.0 and ref["mean_l1"] == 0.0
    assert [v["metric"] for v in verdicts] == ["agreement_top1", "mean_l1"]
    assert all(v["ci_low"] <= v["value"] <= v["ci_high"] for v in verdicts)
    # int8 agrees on all 18 images (the tiny model's classes are far apart): the point rule passes, but 18
    # images cannot show 90% agreement (Clopper-Pearson lower bound 0.83); the distance is far below its gate.
    agree, dist = verdicts
    assert agree["verdict"] == "PASS" and agree["underpowered"] and agree["images_to_settle"] > 18, agree
    assert dist["verdict"] == "PASS" and not dist["underpowered"] and dist["images_to_settle"] is None, dist
    assert code == 0 and "PASS, but 1 of 2 gates are underpowered" in text, text
    assert main(["signoff", str(plan), "--out", str(out), "-q", "--strict"]) == 1  # stored units reused
    page = (out / "report.html").read_text()
    assert "<title>sign-off: label-free</title>" in page and "agree top-1" in page
    # `quantship report` keeps the plan's name as the title
    assert main(["report", str(out)]) == 0
    assert "<title>sign-off: label-free</title>" in (out / "report.html").read_text()


@pytest.mark.slow
def test_eval_on_unlabelled_images_reports_agreement(trained_tiny, unlabelled_folder, tmp_path, capsys):
    from quantship.cli import main

    _, model = trained_tiny
    out = tmp_path / "o"
    argv = ["eval", "--model", str(model), "--preprocess", TINY_PREPROCESS, "--data", f"images:{unlabelled_folder}"]
    code = main([*argv, "--targets", "keras-fp32,tflite-fp16", "--out", str(out), "--calib-images", "4"])
    assert code == 0, capsys.readouterr()
    rows = [json.loads(line) for line in Path(out / "results.jsonl").read_text().splitlines()]
    fp16 = next(r for r in rows if r["target"] == "tflite-fp16")
    assert "top1" not in fp16 and fp16["agreement_top1"] >= 0.9 and 0 <= fp16["mean_l1"] < 0.05


# ------------------------------------------------------------------------------------------- charts


def test_sensitivity_chart_plots_sqnr_when_no_layer_harms_and_never_a_negative_harm():
    from quantship.evaluate.charts import sensitivity_bars, sensitivity_chart

    calm = [
        {"kind": "single", "backend": b, "layer": name, "agreement_top1": 1.0, "sqnr_db": db}
        for b in ("qdq", "tflite")
        for name, db in (("conv1", 31.0), ("dw1", 12.5), ("pw1", 24.0))
    ]
    label, order, bars = sensitivity_bars(calm)
    assert label.startswith("SQNR") and order == ["dw1", "pw1", "conv1"] and bars[("qdq", "dw1")] == 12.5
    helped = [
        {"kind": "single", "backend": "qdq", "layer": "a", "metric": "mAP", "delta": 0.02, "sqnr_db": 20.0},
        {"kind": "single", "backend": "qdq", "layer": "b", "metric": "mAP", "delta": -0.05, "sqnr_db": 30.0},
    ]
    label, order, bars = sensitivity_bars(helped)
    assert label == "drop of mAP" and order == ["b", "a"] and min(bars.values()) == 0.0 and bars[("qdq", "b")] == 0.05
    assert sensitivity_chart(calm)[:4] == b"\x89PNG"


@pytest.mark.slow
def test_sensitivity_on_unlabelled_images_ranks_by_agreement_and_shows_every_backend(
    trained_tiny, unlabelled_folder, tmp_path, capsys
):
    from quantship.cli import main

    _, model = trained_tiny
    out = tmp_path / "s"
    argv = [
        "sensitivity",
        "--model",
        str(model),
        "--preprocess",
        TINY_PREPROCESS,
        "--data",
        f"images:{unlabelled_folder}",
    ]
    code = main([*argv, "--images", "10", "--calib-images", "8", "--show", "2", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    rows = [json.loads(line) for line in (out / "sensitivity.jsonl").read_text().splitlines()]
    single = [r for r in rows if r["kind"] == "single"]
    assert {r["backend"] for r in single} == {"qdq", "tflite"}
    assert all(r["metric"] == "agreement_top1" and "top1" not in r and r["mean_l1"] >= 0 for r in single)
    for backend in ("qdq", "tflite"):
        mine = [r for r in single if r["backend"] == backend]
        keys = [(-r["delta"], r["mean_l1"]) for r in mine]
        assert keys == sorted(keys, reverse=True)  # most harmful first: agreement, then distance
        # --show 2: the two most harmful layers of every backend on the console
        assert sum(1 for line in text.splitlines() if line.startswith(backend + " ")) == 2, text


def test_pseudo_map_scores_the_target_against_the_reference_detections():
    """The reference's detections above the score threshold are the ground truth: the reference scores 1.0 on
    them; a target that loses one object of four and misplaces another scores less, with a bootstrap interval."""
    from quantship.evaluate.tasks import DetectionTask

    task = DetectionTask({"classes": ["cat", "dog"]}, {}, labelled=False)
    box = np.array([[10, 10, 60, 60], [100, 100, 180, 160]], np.float32)

    def arrays(per_image):
        return {
            "keys": np.asarray([f"img{i}" for i in range(len(per_image))]),
            "det_count": np.asarray([len(d[0]) for d in per_image]),
            "det_boxes": np.concatenate([d[0] for d in per_image]).reshape(-1, 4).astype(np.float32),
            "det_scores": np.concatenate([d[1] for d in per_image]).astype(np.float32),
            "det_classes": np.concatenate([d[2] for d in per_image]).astype(np.int64),
        }

    # two images, two confident objects each, and a low-score detection the threshold leaves out of the truth
    ref = arrays([(np.vstack([box, box[:1] + 5]), np.array([0.9, 0.8, 0.3]), np.array([0, 1, 1]))] * 2)
    moved = box.copy()
    moved[1] += 70  # IoU 0 with the reference's box
    tgt = arrays([(box, np.array([0.9, 0.8]), np.array([0, 1])), (moved[:2], np.array([0.9, 0.7]), np.array([0, 1]))])
    assert task.measured == ("pseudo_map",) and task.evaluate(tgt, tgt["keys"]) == {}
    same = task.paired("pseudo_map", ref, ref, ref["keys"], score_threshold=0.5)
    assert same.target == same.reference == 1.0
    paired = task.paired("pseudo_map", tgt, ref, ref["keys"], score_threshold=0.5)
    assert paired.reference == 1.0 and paired.target == pytest.approx(0.75)  # cat AP 1, dog AP 0.5
    strict = task.paired("pseudo_map", tgt, ref, ref["keys"], score_threshold=0.2)  # the 0.3 box joins the truth
    assert strict.target < paired.target
    v = gate_verdict(Gate(metric="pseudo_map", relative=0.9), paired, samples=50)
    assert v["verdict"] == "FAIL" and v["interval"].startswith("bootstrap") and v["ci_low"] <= 0.75 <= v["ci_high"]


def test_min_gate_on_a_resampled_metric_bounds_the_target_value():
    """A min gate on mAP (or pseudo_map) is judged on the target's own value and its bootstrap, not on a
    difference to the reference."""
    rng = np.random.default_rng(1)
    per_image = rng.uniform(0.5, 0.9, 60)

    def resample(idx):
        pick = per_image if idx is None else per_image[idx]
        return float(pick.mean()), 0.95

    paired = PairedSample("mAP", float(per_image.mean()), 0.95, 60, resample=resample)
    v = gate_verdict(Gate(metric="mAP", minimum=0.5), paired, samples=100)
    assert v["verdict"] == "PASS" and not v["underpowered"] and 0.6 < v["ci_low"] <= v["value"] <= v["ci_high"] < 0.8
    assert gate_verdict(Gate(metric="mAP", minimum=0.85), paired, samples=100)["verdict"] == "FAIL"


def test_chunks_join_with_a_chunk_of_no_readable_image():
    from quantship.evaluate.tasks import concat

    task = ClassificationTask(labelled=False)
    full = {**task.score(np.eye(3)[:2], _Batch(["a", "b"])), "skipped": np.zeros(0, str), "seconds": np.ones(1)}
    empty = {**task.empty(), "skipped": np.asarray(["c"]), "seconds": np.ones(1)}
    joined = concat([full, empty])
    assert joined["probs"].shape == (2, 3) and joined["skipped"].tolist() == ["c"] and joined["seconds"].sum() == 2
