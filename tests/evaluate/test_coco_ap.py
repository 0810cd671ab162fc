"""Our COCO AP equals pycocotools, and resamples count a repeated image as separate images."""

from __future__ import annotations

import json

import numpy as np
import pytest

from quantship.evaluate.coco_ap import COCO_STATS, CocoMatcher, bbox_iou
from quantship.evaluate.detection_metrics import CocoMetric, Detections, coco_evaluate


def synthetic_coco(seed: int, n_images: int = 30, n_cats: int = 4, ties: bool = False, jitter: float = 0.12):
    """A COCO annotation dict and results: unsorted image ids, crowd objects, areas from tiny to large (and
    'area' fields below w*h, as segment areas are), duplicated objects (equal IoUs), images without
    objects, missed objects, duplicate and wrong-class detections, background false positives; ``ties``:
    scores from 5 values only."""
    rng = np.random.default_rng(seed)
    cat_ids = sorted(rng.choice(np.arange(1, 30), n_cats, replace=False).tolist())
    images, anns, results = [], [], []
    ids = rng.permutation(np.arange(100, 100 + 3 * n_images))[:n_images]

    def score(hi=1.0):
        return float(rng.integers(1, 6) / 5) if ties else float(rng.random() * hi)

    for i, img_id in enumerate(ids):
        W, H = 640, 480
        images.append({"id": int(img_id), "width": W, "height": H, "file_name": f"{img_id}.jpg"})
        objects = []
        for _ in range(0 if i % 7 == 3 else int(rng.integers(1, 8))):
            s = float(np.exp(rng.uniform(np.log(6), np.log(250))))
            w, h = s * rng.uniform(0.5, 1.5), s * rng.uniform(0.5, 1.5)
            x, y = rng.uniform(0, W - w), rng.uniform(0, H - h)
            c = int(rng.choice(cat_ids))
            area = w * h * (rng.uniform(0.6, 1.0) if rng.random() < 0.5 else 1.0)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": int(img_id),
                    "category_id": c,
                    "bbox": [x, y, w, h],
                    "area": area,
                    "iscrowd": int(rng.random() < 0.08),
                }
            )
            objects.append((x, y, w, h, c))
            if rng.random() < 0.15:  # the same box again (IoU ties), with another area and crowd flag
                anns.append(
                    {
                        "id": len(anns) + 1,
                        "image_id": int(img_id),
                        "category_id": c,
                        "bbox": [x, y, w, h],
                        "area": area * rng.uniform(0.05, 1.0),
                        "iscrowd": int(rng.random() < 0.5),
                    }
                )
        for x, y, w, h, c in objects:
            for _ in range(int(rng.integers(0, 3))):  # 0-2 detections per object: misses and duplicates
                j = rng.normal(0, jitter * min(w, h) + 0.5, 4)
                cc = c if rng.random() < 0.9 else int(rng.choice(cat_ids))
                results.append(
                    {
                        "image_id": int(img_id),
                        "category_id": cc,
                        "bbox": [x + j[0], y + j[1], max(1.0, w + j[2]), max(1.0, h + j[3])],
                        "score": score(),
                    }
                )
        for _ in range(int(rng.integers(0, 4))):
            w, h = rng.uniform(4, 200, 2)
            results.append(
                {
                    "image_id": int(img_id),
                    "category_id": int(rng.choice(cat_ids)),
                    "bbox": [float(rng.uniform(0, W - w)), float(rng.uniform(0, H - h)), float(w), float(h)],
                    "score": score(0.6),
                }
            )
    return {"images": images, "annotations": anns, "categories": [{"id": c, "name": f"c{c}"} for c in cat_ids]}, results


def pycocotools(tmp_path, doc, results, name="ann.json"):
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return coco_evaluate(path, results, [im["id"] for im in doc["images"]])


def copies_as_new_images(doc, results, indices):
    """The resample written out for pycocotools: copy j of the image at sorted position i gets id
    (i + 1) * 1000 + j, with its own objects and detections."""
    ids = sorted(im["id"] for im in doc["images"])
    counts = np.bincount(indices, minlength=len(ids))
    images, anns, res = [], [], []
    for i, old in enumerate(ids):
        for j in range(counts[i]):
            new = (i + 1) * 1000 + j
            images.append({"id": new, "width": 640, "height": 480, "file_name": f"{new}.jpg"})
            anns += [
                dict(a, id=len(anns) + k + 1, image_id=new)
                for k, a in enumerate(a for a in doc["annotations"] if a["image_id"] == old)
            ]
            res += [dict(r, image_id=new) for r in results if r["image_id"] == old]
    return {"images": images, "annotations": anns, "categories": doc["categories"]}, res


def max_diff(a, b):
    assert set(a) == set(b) == set(COCO_STATS)
    return max(abs(a[k] - b[k]) for k in a)


@pytest.mark.parametrize(
    "seed,ties,jitter", [(0, False, 0.12), (1, True, 0.12), (2, False, 0.04), (3, True, 0.02), (4, False, 0.3)]
)
def test_full_set_equals_pycocotools(tmp_path, seed, ties, jitter):
    doc, results = synthetic_coco(seed, ties=ties, jitter=jitter)
    ref = pycocotools(tmp_path, doc, results)
    ours = CocoMatcher.from_coco(doc, results).ap()
    assert max_diff(ours, ref) <= 1e-9, (ours, ref)
    assert all(v > 0 for v in ref.values())  # every figure is exercised


def test_detections_objects_equal_what_coco_metric_scores(tmp_path):
    """The Detections (x1y1x2y2, float32) path, against CocoMetric (pycocotools on the results it writes)."""
    doc, results = synthetic_coco(5, n_images=25, ties=True)  # images in unsorted id order, tied scores
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(doc))
    cat_ids = sorted(c["id"] for c in doc["categories"])
    gts, dets = [], []
    for im in doc["images"]:
        a = [x for x in doc["annotations"] if x["image_id"] == im["id"]]
        gts.append(
            {
                "xywh": np.array([x["bbox"] for x in a]).reshape(-1, 4),
                "area": np.array([x["area"] for x in a]),
                "iscrowd": np.array([x["iscrowd"] for x in a], bool),
                "classes": np.array([cat_ids.index(x["category_id"]) for x in a]),
                "image_id": im["id"],
            }
        )
        r = [x for x in results if x["image_id"] == im["id"]]
        xywh = np.array([x["bbox"] for x in r]).reshape(-1, 4)
        dets.append(
            Detections(
                np.hstack([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]]).astype(np.float32),
                np.array([x["score"] for x in r], np.float32),
                np.array([cat_ids.index(x["category_id"]) for x in r], np.int64),
            )
        )
    metric = CocoMetric(str(path), cat_ids)
    metric.update(dets, gts)
    assert max_diff(CocoMatcher(gts, dets, cat_ids).ap(), metric.result()) <= 1e-9
    # The same from the stored images' ids and the annotation file (what a sign-off run has on disk).
    ids = [g["image_id"] for g in gts]
    assert max_diff(CocoMatcher.for_images(path, ids, dets).ap(), metric.result()) <= 1e-9
    with pytest.raises(ValueError, match="not in the annotation file"):
        CocoMatcher.for_images(path, [123456], [Detections.empty()])


def test_resamples_equal_pycocotools_on_copies_written_as_new_images(tmp_path):
    doc, results = synthetic_coco(6, n_images=12, ties=True)  # tied scores: the order of copies matters
    matcher = CocoMatcher.from_coco(doc, results)
    rng = np.random.default_rng(0)
    for k, indices in enumerate([np.array([0, 0, 1, 5, 5, 5, 7])] + [rng.integers(0, 12, 12) for _ in range(3)]):
        ref = pycocotools(tmp_path, *copies_as_new_images(doc, results, indices), name=f"r{k}.json")
        assert max_diff(matcher.ap(indices), ref) <= 1e-9
        assert matcher.ap(rng.permutation(indices)) == matcher.ap(indices)  # only the multiset matters
    assert matcher.ap(np.arange(12)) == matcher.ap()


def test_perfect_detections_score_one_on_any_resample(tmp_path):
    doc, _ = synthetic_coco(7, n_images=10)
    for a in doc["annotations"]:
        a["iscrowd"] = 0
        a["area"] = a["bbox"][2] * a["bbox"][3]
    rng = np.random.default_rng(1)
    perfect = [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": a["bbox"],
            "score": float(rng.uniform(0.5, 1)),
        }
        for a in doc["annotations"]
    ]
    matcher = CocoMatcher.from_coco(doc, perfect)
    first = sorted(im["id"] for im in doc["images"])[:2]
    for indices in (None, [0, 0, 1], [1, 1, 1, 1], rng.integers(0, 10, 10), rng.integers(0, 10, 25)):
        assert all(v in (1.0, -1.0) for v in matcher.ap(indices).values())
        assert matcher.ap(indices)["mAP"] == 1.0
    # pycocotools on the same resample keyed by image id merges the copies: doubled detections, half false.
    sub = {**doc, "images": [im for im in doc["images"] if im["id"] in first]}
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(sub))
    merged = coco_evaluate(
        path,
        [r for r in perfect if r["image_id"] == first[0]] * 2 + [r for r in perfect if r["image_id"] == first[1]],
        first,
    )
    assert merged["mAP"] < 0.95


def test_bbox_iou_is_pycocotools_bit_for_bit():
    from pycocotools import mask

    rng = np.random.default_rng(2)
    d = np.hstack([rng.uniform(0, 100, (40, 2)), rng.uniform(0.5, 60, (40, 2))])
    g = np.vstack(
        [d[:10] + rng.normal(0, 2, (10, 4)), np.hstack([rng.uniform(0, 100, (15, 2)), rng.uniform(0.5, 60, (15, 2))])]
    )
    crowd = rng.random(25) < 0.3
    np.testing.assert_array_equal(
        bbox_iou(d, g, crowd), mask.iou(d.tolist(), g.tolist(), crowd.astype(np.uint8).tolist())
    )


def test_only_the_top_100_detections_per_image_and_category_count(tmp_path):
    doc, results = synthetic_coco(8, n_images=5, n_cats=2)
    im = doc["images"][0]["id"]
    c = doc["categories"][0]["id"]
    rng = np.random.default_rng(3)
    results = results + [
        {"image_id": im, "category_id": c, "bbox": [float(x), float(y), 30.0, 30.0], "score": float(s)}
        for x, y, s in zip(rng.uniform(0, 600, 130), rng.uniform(0, 450, 130), rng.uniform(0, 1, 130))
    ]
    assert max_diff(CocoMatcher.from_coco(doc, results).ap(), pycocotools(tmp_path, doc, results)) <= 1e-9


def test_edge_cases():
    gt = [
        {"boxes": np.array([[0, 0, 10, 10]], np.float32), "classes": np.array([0])},
        {"boxes": np.zeros((0, 4)), "classes": np.zeros(0, np.int64)},
    ]
    none = [Detections.empty(), Detections.empty()]
    ap = CocoMatcher(gt, none, 2).ap()
    assert ap["mAP"] == 0.0 and ap["AP_small"] == 0.0 and ap["AP_large"] == -1.0
    assert CocoMatcher(gt, none, 2).ap([1, 1])["mAP"] == -1.0  # no objects drawn
    empty = CocoMatcher([], [], 3)
    assert empty.ap()["mAP"] == -1.0
    with pytest.raises(ValueError):
        CocoMatcher(gt, [Detections(np.zeros((1, 4)), np.ones(1), np.array([5])), Detections.empty()], 2)
    with pytest.raises(IndexError):
        CocoMatcher(gt, none, 2).ap([2])


def test_bootstrap_is_paired_by_seed():
    doc, results = synthetic_coco(9, n_images=20)
    m = CocoMatcher.from_coco(doc, results)
    a, b = m.bootstrap(30, seed=4), m.bootstrap(30, seed=4)
    rng = np.random.default_rng(4)
    assert np.array_equal(a, b) and a.shape == (30,)
    assert a[0] == m.ap(rng.integers(0, 20, 20), ("mAP",))["mAP"]


def test_equal_ious_go_to_the_later_object(tmp_path):
    """A detection exactly between two objects takes the later one (pycocotools' loop), which decides
    whether the next detection still finds its object."""
    doc = {
        "images": [{"id": 1, "width": 100, "height": 100, "file_name": "1.jpg"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "area": 1600, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [18, 10, 40, 40], "area": 1600, "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "a"}],
    }
    results = [
        {"image_id": 1, "category_id": 1, "bbox": [14, 10, 40, 40], "score": 0.9},  # IoU 0.818 with both
        {"image_id": 1, "category_id": 1, "bbox": [6, 10, 40, 40], "score": 0.8},
    ]  # 0.818 with the first, 0.538 the second
    ref = pycocotools(tmp_path, doc, results)
    # Both found up to IoU 0.8 (7 of 10 thresholds): the first detection took the second object.
    assert ref["AP75"] == 1.0 and ref["mAP"] == pytest.approx(0.7)
    assert max_diff(CocoMatcher.from_coco(doc, results).ap(), ref) == 0.0
