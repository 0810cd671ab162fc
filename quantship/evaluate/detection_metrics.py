"""Detection metrics: PASCAL VOC AP (VOC07 11-point and VOC2010+ all-point) as the official devkit computes
it, and COCO AP / AP50 / AP75 / AP small / medium / large through pycocotools."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from quantship.data.detection import Detections
from quantship.lazy import lazy_import

__all__ = ["CocoMetric", "Detections", "VocMetric", "coco_evaluate", "voc_ap"]


def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool) -> float:
    """AP from a precision/recall curve: VOC07's 11-point interpolation, or the area under the monotone
    precision envelope (VOC2010 and later)."""
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            p = precision[recall >= t].max() if np.any(recall >= t) else 0.0
            ap += p / 11.0
        return float(ap)
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    for i in range(mpre.size - 1, 0, -1):
        mpre[i - 1] = max(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def _iou_voc(box: np.ndarray, gts: np.ndarray) -> np.ndarray:
    """IoU with the devkit's +1 pixel convention (inclusive pixel coordinates)."""
    ixmin = np.maximum(gts[:, 0], box[0])
    iymin = np.maximum(gts[:, 1], box[1])
    ixmax = np.minimum(gts[:, 2], box[2])
    iymax = np.minimum(gts[:, 3], box[3])
    iw = np.maximum(ixmax - ixmin + 1.0, 0.0)
    ih = np.maximum(iymax - iymin + 1.0, 0.0)
    inter = iw * ih
    union = (
        (box[2] - box[0] + 1.0) * (box[3] - box[1] + 1.0)
        + (gts[:, 2] - gts[:, 0] + 1.0) * (gts[:, 3] - gts[:, 1] + 1.0)
        - inter
    )
    return inter / union


@dataclass
class VocMetric:
    """Accumulates detections and ground truth; ``result()`` gives per-class AP and mAP.

    Difficult objects as in the devkit: not counted as positives, and a detection matched to one is neither a
    true nor a false positive. A second detection of an already matched object is a false positive. A class
    without ground truth has AP nan and is left out of mAP; a class with ground truth but no detection has
    AP 0.
    """

    classes: Sequence[str]
    iou_threshold: float = 0.5
    use_07_metric: bool = True
    _dets: list[tuple[int, Detections]] = field(default_factory=list)
    _gts: list[dict[str, np.ndarray]] = field(default_factory=list)

    def update(self, detections: Sequence[Detections], targets: Sequence[dict[str, Any]]) -> None:
        for det, gt in zip(detections, targets):
            self._dets.append((len(self._gts), det))
            self._gts.append(gt)

    @property
    def count(self) -> int:
        return len(self._gts)

    def per_class_ap(self, use_07_metric: bool | None = None) -> dict[str, float]:
        use_07 = self.use_07_metric if use_07_metric is None else use_07_metric
        out = {}
        for c, name in enumerate(self.classes):
            gts = {}
            npos = 0
            for i, gt in enumerate(self._gts):
                mask = gt["classes"] == c
                diff = gt.get("difficult", np.zeros(len(gt["classes"]), bool))[mask]
                gts[i] = {"boxes": gt["boxes"][mask], "difficult": diff, "detected": np.zeros(mask.sum(), bool)}
                npos += int((~diff).sum())
            image_ids, scores, boxes = [], [], []
            for i, det in self._dets:
                m = det.classes == c
                image_ids += [i] * int(m.sum())
                scores.append(det.scores[m])
                boxes.append(det.boxes[m])
            if npos == 0:
                out[name] = float("nan")
                continue
            if not image_ids:
                out[name] = 0.0
                continue
            scores_a = np.concatenate(scores)
            boxes_a = np.concatenate(boxes)
            order = np.argsort(-scores_a, kind="stable")
            tp = np.zeros(len(order))
            fp = np.zeros(len(order))
            for d, k in enumerate(order):
                g = gts[image_ids[k]]
                if len(g["boxes"]) == 0:
                    fp[d] = 1
                    continue
                ious = _iou_voc(boxes_a[k].astype(np.float64), g["boxes"].astype(np.float64))
                j = int(np.argmax(ious))
                if ious[j] > self.iou_threshold:
                    if g["difficult"][j]:
                        continue
                    if not g["detected"][j]:
                        tp[d] = 1
                        g["detected"][j] = True
                    else:
                        fp[d] = 1
                else:
                    fp[d] = 1
            tp, fp = np.cumsum(tp), np.cumsum(fp)
            rec = tp / npos
            prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
            out[name] = voc_ap(rec, prec, use_07)
        return out

    def result(self) -> dict[str, Any]:
        ap07 = self.per_class_ap(True)
        ap = self.per_class_ap(False)
        valid07 = [v for v in ap07.values() if not np.isnan(v)]
        valid = [v for v in ap.values() if not np.isnan(v)]
        return {
            "mAP": float(np.mean(valid07)) if valid07 else float("nan"),  # VOC07 11-point, the VOC2007 test figure
            "mAP_allpoint": float(np.mean(valid)) if valid else float("nan"),
            "per_class_ap": ap07,
            "per_class_ap_allpoint": ap,
        }


@dataclass
class CocoMetric:
    """COCO box AP through pycocotools on the annotation file the dataset was read from."""

    annotation_file: str
    category_ids: Sequence[int]
    _results: list[dict[str, Any]] = field(default_factory=list)
    _image_ids: list[int] = field(default_factory=list)

    def update(self, detections: Sequence[Detections], targets: Sequence[dict[str, Any]]) -> None:
        for det, gt in zip(detections, targets):
            self._image_ids.append(int(gt["image_id"]))
            for box, score, cls in zip(det.boxes, det.scores, det.classes):
                x1, y1, x2, y2 = (float(v) for v in box)
                self._results.append(
                    {
                        "image_id": int(gt["image_id"]),
                        "category_id": int(self.category_ids[int(cls)]),
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "score": float(score),
                    }
                )

    @property
    def count(self) -> int:
        return len(self._image_ids)

    def result(self) -> dict[str, Any]:
        return coco_evaluate(self.annotation_file, self._results, self._image_ids)


def metric_for(meta: dict[str, Any]) -> "VocMetric | CocoMetric":
    """The metric a detection dataset is scored with (from its loader's ``meta``)."""
    if meta.get("metric") == "coco":
        return CocoMetric(meta["annotation_file"], meta["category_ids"])
    return VocMetric(meta["classes"])


COCO_STATS = ("mAP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large")


def coco_evaluate(
    annotation_file: str | Path, results: list[dict[str, Any]], image_ids: Sequence[int]
) -> dict[str, Any]:
    """pycocotools' COCOeval (bbox) on ``results`` restricted to ``image_ids``; its printout is suppressed."""
    coco_mod = lazy_import("pycocotools.coco", "pycocotools", "COCO metrics")
    eval_mod = lazy_import("pycocotools.cocoeval", "pycocotools", "COCO metrics")
    with contextlib.redirect_stdout(io.StringIO()):
        gt = coco_mod.COCO(str(annotation_file))
        if not results:
            return {k: 0.0 for k in COCO_STATS}
        dt = gt.loadRes(json.loads(json.dumps(results)))
        ev = eval_mod.COCOeval(gt, dt, "bbox")
        ev.params.imgIds = sorted(set(image_ids))
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: float(v) for k, v in zip(COCO_STATS, ev.stats[:6])}
