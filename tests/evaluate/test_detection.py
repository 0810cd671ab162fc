"""Detection: VOC/COCO loaders, metrics on hand-computed cases, SSD models, and every runtime on a tiny
detector trained here."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from detection_fixtures import COCO_IDS, SIZE, train_tiny_detector, write_coco, write_voc
from quantship.data.datasets import load_dataset
from quantship.errors import DataError
from quantship.evaluate.detection_metrics import CocoMetric, Detections, VocMetric, coco_evaluate, voc_ap
from quantship.models.ssd import decode_boxes, encode_boxes, make_anchors, nms, ssd_anchor_config

# ------------------------------------------------------------------------------------- metrics by hand


def _gt(boxes, classes, difficult=None):
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    return {
        "boxes": boxes,
        "classes": np.asarray(classes, np.int64),
        "difficult": np.asarray(difficult or [False] * len(boxes), bool),
    }


def _det(boxes, scores, classes):
    return Detections(
        np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(scores, np.float32), np.asarray(classes, np.int64)
    )


def test_duplicate_detection_is_a_false_positive():
    m = VocMetric(["a", "b"])
    m.update(
        [_det([[10, 10, 50, 50], [11, 10, 50, 51]], [0.9, 0.8], [0, 0]), _det([[0, 0, 20, 20]], [0.7], [0])],
        [_gt([[10, 10, 50, 50]], [0]), _gt([[0, 0, 20, 20]], [0])],
    )
    # tp=[1,0,1] fp=[0,1,0]: recall [.5,.5,1], precision [1,.5,2/3]
    assert m.per_class_ap(False)["a"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert m.per_class_ap(True)["a"] == pytest.approx((6 * 1 + 5 * 2 / 3) / 11)


def test_difficult_objects_are_ignored():
    gt = _gt([[10, 10, 50, 50], [60, 60, 90, 90]], [0, 0], [False, True])
    m = VocMetric(["a"])
    m.update([_det([[60, 60, 90, 90], [10, 10, 50, 50]], [0.95, 0.9], [0, 0])], [gt])
    assert m.per_class_ap(True)["a"] == pytest.approx(1.0)  # the hit on the difficult object is neither TP nor FP
    plain = VocMetric(["a"])
    plain.update([_det([[60, 60, 90, 90], [10, 10, 50, 50]], [0.95, 0.9], [0, 0])], [_gt([[10, 10, 50, 50]], [0])])
    assert plain.per_class_ap(True)["a"] < 1.0  # the same detection on background is a false positive


def test_class_without_detections_and_class_without_ground_truth():
    m = VocMetric(["a", "b", "c"])
    m.update([_det([[10, 10, 50, 50]], [0.9], [0])], [_gt([[10, 10, 50, 50], [0, 0, 5, 5]], [0, 1])])
    ap = m.per_class_ap(True)
    assert ap["a"] == pytest.approx(1.0) and ap["b"] == 0.0 and np.isnan(ap["c"])
    assert m.result()["mAP"] == pytest.approx(0.5)  # c is left out


def test_voc_ap_interpolations():
    rec, prec = np.array([0.2, 0.4, 0.4, 0.8]), np.array([1.0, 1.0, 0.67, 0.8])
    assert voc_ap(rec, prec, False) == pytest.approx(0.4 * 1.0 + 0.4 * 0.8)
    assert voc_ap(rec, prec, True) == pytest.approx((5 * 1.0 + 4 * 0.8) / 11)


def test_anchor_encoding_round_trip_and_nms():
    anchors = make_anchors(ssd_anchor_config(300))
    assert len(anchors) == 8732
    boxes = np.clip(np.random.default_rng(0).uniform(0, 1, (len(anchors), 4)), 0, 1)
    boxes = np.concatenate(
        [np.minimum(boxes[:, :2], boxes[:, 2:]), np.maximum(boxes[:, :2], boxes[:, 2:]) + 0.01], axis=1
    )
    np.testing.assert_allclose(decode_boxes(encode_boxes(boxes, anchors), anchors), boxes, atol=1e-5)
    keep = nms(
        np.array([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], np.float32), np.array([0.9, 0.8, 0.7]), 0.45
    )
    assert keep.tolist() == [0, 2]


# ---------------------------------------------------------------------------------------------- data


def test_voc_and_coco_loaders_agree(tmp_path):
    voc = load_dataset(f"voc2007:{write_voc(tmp_path / 'v', 6, seed=5)}")
    coco = load_dataset(f"coco:{write_coco(tmp_path / 'c', 6, seed=5)}")
    assert voc.task == coco.task == "detection" and len(voc) == len(coco) == 6
    for a, b in zip(voc.samples, coco.samples):
        np.testing.assert_array_equal(a.label["classes"], b.label["classes"])
        # VOC: 1-based inclusive corners; COCO: 0-based x, y, w, h (x + w is one past the last pixel)
        np.testing.assert_allclose(a.label["boxes"] - np.array([1, 1, 0, 0]), b.label["boxes"])
    assert coco.meta["category_ids"] == COCO_IDS and voc.meta["classes"][7] == "cat"
    assert any(s.label["difficult"].any() for s in voc.samples)


def test_bad_detection_data(tmp_path):
    root = write_voc(tmp_path / "v", 3, seed=1) / "VOC2007"
    (root / "Annotations" / "000001.xml").write_text("<annotation><size><width>10</width>")
    with pytest.raises(DataError, match="000001.xml: malformed XML"):
        load_dataset(f"voc2007:{root}")
    root = write_voc(tmp_path / "w", 3, seed=1) / "VOC2007"
    xml = root / "Annotations" / "000002.xml"
    xml.write_text(xml.read_text().replace("<xmax>", "<xmax>9").replace("<ymax>", "<ymax>9"))
    with pytest.raises(DataError, match="000002.xml: object 0 .* outside"):
        load_dataset(f"voc2007:{root}")
    root = write_voc(tmp_path / "x", 3, seed=1) / "VOC2007"
    (root / "JPEGImages" / "000000.jpg").unlink()
    with pytest.raises(DataError, match="1 listed image.*missing.*000000.jpg"):
        load_dataset(f"voc2007:{root}")
    root = write_voc(tmp_path / "y", 3, seed=1) / "VOC2007"
    xml = root / "Annotations" / "000000.xml"
    xml.write_text(
        xml.read_text()
        .replace("<name>cat</name>", "<name>unicorn</name>")
        .replace("<name>dog</name>", "<name>unicorn</name>")
    )
    with pytest.raises(DataError, match="unknown class 'unicorn'"):
        load_dataset(f"voc2007:{root}")
    coco = write_coco(tmp_path / "c", 2, seed=1)
    ann = coco / "annotations" / "instances_val2017.json"
    ann.write_text(ann.read_text()[:-20])
    with pytest.raises(DataError, match="instances_val2017.json: malformed JSON at line 1"):
        load_dataset(f"coco:{coco}")


def test_our_coco_numbers_equal_pycocotools(tmp_path):
    root = write_coco(tmp_path / "c", 8, seed=3)
    ds = load_dataset(f"coco:{root}")
    rng = np.random.default_rng(0)
    dets = []
    for s in ds.samples:
        b = s.label["boxes"] + rng.normal(0, 2, s.label["boxes"].shape).astype(np.float32)
        dets.append(
            _det(np.vstack([b, [[1, 1, 20, 20]]]), rng.uniform(0.3, 1.0, len(b) + 1), np.append(s.label["classes"], 7))
        )
    ours = CocoMetric(ds.meta["annotation_file"], ds.meta["category_ids"])
    ours.update(dets, [s.label for s in ds.samples])
    # Straight pycocotools on the same detections, written as the COCO results format by hand.
    results = [
        {
            "image_id": s.label["image_id"],
            "category_id": COCO_IDS[int(c)],
            "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
            "score": float(sc),
        }
        for s, d in zip(ds.samples, dets)
        for (x1, y1, x2, y2), sc, c in zip(d.boxes, d.scores, d.classes)
    ]
    direct = coco_evaluate(
        root / "annotations" / "instances_val2017.json", results, [s.label["image_id"] for s in ds.samples]
    )
    assert ours.result() == direct
    assert 0.3 < direct["AP50"] <= 1.0


# ---------------------------------------------------------------------------------------------- models


# The weighted layers of the published Keras SSD300 (pierluigiferrari/ssd_keras, models/keras_ssd300.py) with
# their kernel shapes for PASCAL VOC (21 classes; 4, 6, 6, 6, 4, 4 boxes per cell), written down from that
# file rather than from our model, so that a renamed or reshaped layer of ours fails the test.
_VGG = [("conv1_1", 3, 64), ("conv1_2", 64, 64), ("conv2_1", 64, 128), ("conv2_2", 128, 128), ("conv3_1", 128, 256),
        ("conv3_2", 256, 256), ("conv3_3", 256, 256), ("conv4_1", 256, 512), ("conv4_2", 512, 512),
        ("conv4_3", 512, 512), ("conv5_1", 512, 512), ("conv5_2", 512, 512), ("conv5_3", 512, 512)]  # fmt: skip
_EXTRA = [("fc6", 3, 512, 1024), ("fc7", 1, 1024, 1024), ("conv6_1", 1, 1024, 256), ("conv6_2", 3, 256, 512),
          ("conv7_1", 1, 512, 128), ("conv7_2", 3, 128, 256), ("conv8_1", 1, 256, 128), ("conv8_2", 3, 128, 256),
          ("conv9_1", 1, 256, 128), ("conv9_2", 3, 128, 256)]  # fmt: skip
_HEADS = [("conv4_3_norm", 512, 4), ("fc7", 1024, 6), ("conv6_2", 512, 6), ("conv7_2", 256, 6), ("conv8_2", 256, 4),
          ("conv9_2", 256, 4)]  # fmt: skip
SSD300_VOC_LAYERS = {
    **{name: (3, 3, cin, cout) for name, cin, cout in _VGG},
    **{name: (k, k, cin, cout) for name, k, cin, cout in _EXTRA},
    **{
        f"{src}_mbox_{kind}": (3, 3, cin, boxes * width)
        for src, cin, boxes in _HEADS
        for kind, width in (("conf", 21), ("loc", 4))
    },
}
SSD300_UNWEIGHTED = ["input_1", "identity_layer", "input_mean_normalization", "input_channel_swap", "pool1", "pool2",
                     "pool3", "pool4", "pool5", "conv6_padding", "conv7_padding", "conv4_3_norm_mbox_priorbox",
                     "mbox_conf", "mbox_loc", "mbox_priorbox", "mbox_conf_softmax", "predictions"]  # fmt: skip


@pytest.mark.slow
def test_ssd300_loads_a_keras_ssd_weight_file_by_layer_name(tmp_path):
    import h5py

    from quantship.models.loading import load_model

    rng = np.random.default_rng(0)
    path = tmp_path / "VGG_VOC0712_SSD_300x300_iter_120000.h5"
    expected = {}
    with h5py.File(path, "w") as f:  # the layout of Keras 2's save_weights, as ssd_keras published its weights
        names = ["input_1", *SSD300_VOC_LAYERS, "conv4_3_norm", *SSD300_UNWEIGHTED[1:]]
        f.attrs["layer_names"] = [n.encode() for n in names]
        for name in names:
            g = f.create_group(name)
            if name == "conv4_3_norm":
                shapes = {f"{name}/{name}_gamma:0": (512,)}
            elif name in SSD300_VOC_LAYERS:
                shape = SSD300_VOC_LAYERS[name]
                shapes = {f"{name}/kernel:0": shape, f"{name}/bias:0": (shape[-1],)}
            else:
                shapes = {}
            g.attrs["weight_names"] = [w.encode() for w in shapes]
            vals = [rng.normal(size=shp).astype(np.float32) for shp in shapes.values()]
            for w, v in zip(shapes, vals):
                g.create_dataset(w, data=v)
            if vals:
                expected[name] = vals
    loaded = load_model("ssd300", path).model
    assert len(expected) == len(SSD300_VOC_LAYERS) + 1
    for name, vals in expected.items():
        got = loaded.get_layer(name).get_weights()
        assert len(got) == len(vals), name
        for g, want in zip(got, vals):
            np.testing.assert_array_equal(g, want)


@pytest.mark.slow
def test_detection_models_build_with_their_anchor_counts():
    from quantship.models import get_model_spec
    from quantship.models.ssd import make_anchors

    for name, n in (("ssd512", 24564), ("ssdlite_mobilenet_v2", None)):
        spec = get_model_spec(name)
        model = spec.build()
        anchors = len(make_anchors(spec.extra["anchors"](21)))
        assert model.outputs[0].shape[1:] == (anchors, 25) and (n is None or anchors == n)


@pytest.fixture(scope="module")
def tiny_detector(tmp_path_factory):
    model, cfg = train_tiny_detector()
    root = tmp_path_factory.mktemp("det")
    model.save(root / "tiny_ssd.keras")
    cfg.save(root / "anchors.json")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["voc2007", "coco"])
def test_every_runtime_on_a_trained_tiny_detector(tiny_detector, tmp_path, kind, capfd):
    from quantship.cli import main

    data = write_voc(tmp_path / "v", 60, seed=9) if kind == "voc2007" else write_coco(tmp_path / "c", 60, seed=9)
    out = tmp_path / "out"
    capfd.readouterr()
    code = main(
        [
            "eval",
            "--task",
            "detection",
            "--data",
            f"{kind}:{data}",
            "--model",
            str(tiny_detector / "tiny_ssd.keras"),
            "--anchors",
            str(tiny_detector / "anchors.json"),
            "--preprocess",
            f"mode=tf,size={SIZE},crop_pct=1.0,resize=stretch",
            "--calib-images",
            "20",
            "--targets",
            "keras-fp32,tflite-fp32,tflite-int8,onnx-fp32,qdq-int8-entropy",
            "--out",
            str(out),
        ]
    )
    res = capfd.readouterr()
    assert code == 0, res.err
    rows = {r["target"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    ref = rows["keras-fp32"]
    assert ref["images"] == 40 and ref["mAP"] > 0.5, ref  # the detector learned the task
    assert rows["tflite-fp32"]["mAP"] == pytest.approx(ref["mAP"], abs=0.01)
    assert rows["onnx-fp32"]["mAP"] == pytest.approx(ref["mAP"], abs=0.01)
    for t in ("tflite-int8", "qdq-int8-entropy"):
        assert abs(rows[t]["delta_mAP"]) < 0.15  # int8 stays close to fp32 on this easy task
    assert "mAP" in res.out and "tflite-int8" in res.out
    if kind == "voc2007":
        md = (out / "results.md").read_text()
        assert "Per-class AP" in md and "| cat |" in md and "| dog |" in md
    else:
        assert "AP50" in ref and 0 < ref["AP50"] <= 1


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["voc2007", "coco"])
def test_signoff_gates_detection_on_map(tiny_detector, tmp_path, kind, capfd):
    import yaml

    from quantship.cli import main

    data = write_voc(tmp_path / "v", 50, seed=4) if kind == "voc2007" else write_coco(tmp_path / "c", 50, seed=4)
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        yaml.safe_dump(
            {
                "name": "det",
                "dataset": f"{kind}:{data}",
                "limit": 40,
                "calibration": {"num_images": 10},
                "chunk_images": 16,
                "models": [
                    {
                        "name": str(tiny_detector / "tiny_ssd.keras"),
                        "preprocess": {"mode": "tf", "size": SIZE, "crop_pct": 1.0, "resize": "stretch"},
                    }
                ],
                "targets": ["tflite-int8"],
                "anchors": str(tiny_detector / "anchors.json"),
                "bootstrap_samples": 50,
                "bench": False,  # the bench pass is tested in test_signoff_report.py
                "gates": [{"metric": "mAP", "relative": 0.9}, {"metric": "mAP", "relative": 1.2}],
            }
        )
    )
    code = main(["signoff", str(plan), "--out", str(tmp_path / "o")])
    assert code == 1, capfd.readouterr().err  # the second gate cannot pass
    verdicts = [json.loads(line) for line in (tmp_path / "o" / "verdicts.jsonl").read_text().splitlines()]
    assert [v["passed"] for v in verdicts] == [True, False]
    assert all(
        v["metric"] == "mAP" and v["images"] == 40 and v["ci_low"] <= v["value"] <= v["ci_high"] for v in verdicts
    )
    assert all(v["interval"].startswith("bootstrap") and "approximate" in v["interval"] for v in verdicts)
    rows = [json.loads(line) for line in (tmp_path / "o" / "signoff.jsonl").read_text().splitlines()]
    assert {r["target"] for r in rows} == {"keras-fp32", "tflite-int8"} and all(r["task"] == "detection" for r in rows)
    report = (tmp_path / "o" / "report.md").read_text()
    if kind == "voc2007":  # the report carries the per-class AP table results.md has
        assert "## Per-class AP (VOC07 11-point)" in report and "| cat |" in report


def test_coco_intervals_treat_a_repeated_image_as_its_own_image(tmp_path):
    """Perfect detections: every resample scores 1.0, whatever images it repeats (pycocotools merged repeated
    image ids and scored 0.835 on [0, 0, 1]); the interval of a relative gate is [1, 1]."""
    from quantship.config import Gate
    from quantship.evaluate.tasks import make_task
    from quantship.evaluate.verdicts import gate_verdict

    ds = load_dataset(f"coco:{write_coco(tmp_path / 'c', 12, seed=2)}")
    task = make_task(ds)
    labels = [s.label for s in ds.samples]
    arrays = {
        "keys": np.asarray([s.key for s in ds.samples]),
        "det_count": np.asarray([len(lab["boxes"]) for lab in labels]),
        "det_boxes": np.concatenate([lab["boxes"] for lab in labels]).astype(np.float32),
        "det_scores": np.ones(sum(len(lab["boxes"]) for lab in labels), np.float32),
        "det_classes": np.concatenate([lab["classes"] for lab in labels]).astype(np.int64),
    }
    paired = task.paired("mAP", arrays, arrays, arrays["keys"])
    assert paired.target == paired.reference == 1.0
    assert paired.resample(np.array([0, 0, 1])) == (1.0, 1.0)
    v = gate_verdict(Gate(metric="mAP", relative=0.99, decision="interval"), paired, samples=50)
    assert (v["ci_low"], v["ci_high"], v["verdict"]) == (1.0, 1.0, "PASS")


def test_saved_model_with_l2_normalization_loads_in_a_fresh_process(tmp_path):
    import keras

    from quantship.models.ssd import l2norm_layer

    inputs = keras.Input((8, 8, 4))
    model = keras.Model(inputs, l2norm_layer()(20.0, name="conv4_3_norm")(inputs))
    model.save(tmp_path / "m.keras")
    code = (
        "from quantship.models.loading import load_model; from quantship.config import PreprocessSpec; "
        f"m = load_model({str(tmp_path / 'm.keras')!r}, preprocess=PreprocessSpec(size=(8, 8))).model; "
        "print(m.get_layer('conv4_3_norm').get_weights()[0][:2])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "20." in out.stdout


@pytest.mark.slow
def test_sensitivity_and_fallback_rank_detection_layers_on_map(tiny_detector, tmp_path):
    """Per-layer sensitivity and the float fallback work for a detection model, on mAP (the task's metric)."""
    from quantship.config import CalibrationSpec, Gate, parse_preprocess_overrides
    from quantship.errors import ConfigError
    from quantship.sensitivity import Analyses, SensitivitySpec, prepare, run_analyses

    data = write_voc(tmp_path / "v", 40, seed=5)
    spec = SensitivitySpec(
        str(tiny_detector / "tiny_ssd.keras"),
        f"voc2007:{data}",
        images=30,
        calibration=CalibrationSpec(num_images=10),
        preprocess_overrides=parse_preprocess_overrides(f"mode=tf,size={SIZE},crop_pct=1.0,resize=stretch"),
        anchors=str(tiny_detector / "anchors.json"),
    )
    setup = prepare(spec, tmp_path / "s")
    try:
        assert setup.held.task.name == "detection"
        rows, result = run_analyses(setup, Analyses(backends=("qdq",), gate=Gate.parse("mAP>=0.9")))
        with pytest.raises(ConfigError, match="metric 'top1' is not measured for detection"):
            run_analyses(setup, Analyses(backends=("qdq",), gate=Gate.parse("top1>=0.9")))
    finally:
        setup.close()
    single = [r for r in rows if r["kind"] == "single"]
    assert single and all(r["metric"] == "mAP" and 0 <= r["value"] <= 1 and "agreement_top1" not in r for r in single)
    assert [r["rank"] for r in single] == list(range(1, len(single) + 1))
    assert all(r["reference_mAP"] > 0.5 for r in single)  # the trained detector finds the shapes
    steps = [r for r in rows if r["kind"] == "fallback"]
    assert steps and result is not None and steps[-1]["passed"] == result.passed
    assert all(s["passed"] == (s["mAP"] >= 0.9 * s["reference_mAP"]) for s in steps)
