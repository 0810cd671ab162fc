"""COCO box AP computed in numpy, equal to pycocotools, and fast to recompute on bootstrap resamples of images.

Why: a bootstrap of mAP resamples images with repetition. pycocotools keys everything by image id, so an
image drawn twice is one image with every detection doubled (perfect detections on a resample [0, 0, 1]
can score 0.835, not 1.0), and each resample costs a full COCOeval. Here an image drawn k times counts as k
separate images, each with its own ground truth and detections, exactly as if the copies had been written
under new image ids; and the expensive part is done once.

How: matching detections to ground truth is per image and category (pycocotools' ``evaluateImg``), so it
does not change when images are resampled. :class:`CocoMatcher` runs it once for every image, category,
area range and IoU threshold, with pycocotools' rules: detections sorted by score (stable mergesort, ties
in input order) and cut to the top ``maxDets`` = 100 per image and category; ground truth sorted with
ignored objects last; greedy matching, each detection taking the best still-free object with IoU >= the
threshold (ties to the later object), preferring regular objects over ignored ones; crowd objects can be
matched many times and are ignored; objects outside the area range are ignored; unmatched detections
outside the area range are ignored. IoU is pycocotools' bbox IoU (crowd: intersection over the
detection's area), in the same float64 operations, so threshold comparisons agree bit for bit.

:meth:`CocoMatcher.ap` then accumulates a resample as pycocotools' ``accumulate`` would for the images
written out with multiplicity: all detections of a category sorted by score (stable), cumulative true and
false positives, recall = tp / (non-ignored objects), precision = tp / (tp + fp + eps) made monotone from
the right, read at the 101 recall thresholds, averaged over thresholds and over categories with objects.
Vectorised: the detections are sorted once; a resample only gathers its detections (with repeats), counts
false positives cumulatively over (IoU threshold x detection) arrays, and evaluates precision and recall
at the true positives only, reducing per recall bin with ``np.maximum.reduceat``: precision at a recall
threshold is the maximum precision at any position whose recall reaches it (and that maximum sits at a
true positive), identical to pycocotools' envelope-then-searchsorted. The matching itself is batched over
(image, category) groups of similar size, one detection rank at a time.

Order of images: pycocotools concatenates images in increasing id order, and the order of detections with
equal scores from different images depends on it. The full set (``indices=None``) uses the id order (the
``image_id`` of each ground-truth entry, else the input order); a resample is evaluated in the same order
with the copies of an image next to each other (as if copy j of image i had id (rank of i, j)), so the
result depends only on which images were drawn and how often, not on the order of ``indices``.

Exactness: with ground truth as COCO's own ``xywh`` and ``area`` (:meth:`CocoMatcher.from_coco` and
:meth:`CocoMatcher.for_images` read them from the annotation file) the figures are pycocotools' bit for bit
(tests: max abs difference 0.0). Ground truth given as the COCO loader's labels (``boxes`` x1y1x2y2 in
float32, no ``area``) is converted back to xywh, which can differ from the file in the last bits, and its
area defaults to w * h, while COCO's ``area`` is the segment's area (it decides small/medium/large), so use
``for_images`` with the annotation file for COCO itself.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
RECALL_THRESHOLDS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
AREA_RANGES = {
    "all": (0.0**2, 1e5**2),
    "small": (0.0**2, 32.0**2),
    "medium": (32.0**2, 96.0**2),
    "large": (96.0**2, 1e5**2),
}
AREAS = tuple(AREA_RANGES)
MAX_DETS = 100
# pycocotools' summarize() figures 0-5, under the names detection_metrics.coco_evaluate uses.
COCO_STATS = ("mAP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large")
_STAT_AREA = {
    "mAP": "all",
    "AP50": "all",
    "AP75": "all",
    "AP_small": "small",
    "AP_medium": "medium",
    "AP_large": "large",
}
_STAT_IOU = {"AP50": 0.5, "AP75": 0.75}
_EPS = np.spacing(1)
_R = len(RECALL_THRESHOLDS)


def bbox_iou(dt: np.ndarray, gt: np.ndarray, iscrowd: np.ndarray) -> np.ndarray:
    """pycocotools' bbIou in the same float64 operations: (D, G) IoU of xywh boxes; for a crowd object the
    union is the detection's area."""
    dt, gt = np.asarray(dt, np.float64).reshape(1, -1, 4), np.asarray(gt, np.float64).reshape(1, -1, 4)
    return bbox_iou_batched(dt, gt, np.asarray(iscrowd, bool).reshape(1, -1))[0]


def bbox_iou_batched(dt: np.ndarray, gt: np.ndarray, iscrowd: np.ndarray) -> np.ndarray:
    """:func:`bbox_iou` for a batch: dt (B, D, 4), gt (B, G, 4), iscrowd (B, G) -> (B, D, G)."""
    da = (dt[..., 2] * dt[..., 3])[:, :, None]
    ga = (gt[..., 2] * gt[..., 3])[:, None, :]
    w = np.minimum((dt[..., 2] + dt[..., 0])[:, :, None], (gt[..., 2] + gt[..., 0])[:, None, :]) - np.maximum(
        dt[..., 0][:, :, None], gt[..., 0][:, None, :]
    )
    h = np.minimum((dt[..., 3] + dt[..., 1])[:, :, None], (gt[..., 3] + gt[..., 1])[:, None, :]) - np.maximum(
        dt[..., 1][:, :, None], gt[..., 1][:, None, :]
    )
    inter = w * h
    union = np.where(iscrowd[:, None, :], da, da + ga - inter)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((w > 0) & (h > 0), inter / union, 0.0)


def _greedy_match(
    ious: np.ndarray, d_valid: np.ndarray, regular: np.ndarray, ignored: np.ndarray, crowd: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """pycocotools' evaluateImg matching for a batch of (image, category) groups, all IoU thresholds at once.

    ``ious`` (B, D, G): detections in score order, objects in input order, padding anywhere masked out by
    ``d_valid`` (B, D) and ``regular | ignored`` (B, G). pycocotools sorts ignored objects last and walks
    them in that order, each detection taking the still-free object with the highest IoU >= the threshold
    (a later object wins a tie) and stopping at the first ignored object once it holds a regular one: so a
    regular candidate always beats an ignored one, and within each kind a later object wins ties. Crowd
    objects stay free. Returns (matched, matched_to_ignored), both (B, T, D) bool."""
    B, D, G = ious.shape
    T = IOU_THRESHOLDS.size
    thr = np.minimum(IOU_THRESHOLDS, 1 - 1e-10)[None, :, None]
    matched = np.zeros((B, T, D), bool)
    on_ignored = np.zeros((B, T, D), bool)
    taken = np.zeros((B, T, G), bool)
    free_always = crowd[:, None, :]
    bi, ti = np.meshgrid(np.arange(B), np.arange(T), indexing="ij")
    for d in range(D):
        row = ious[:, d, None, :]  # (B, 1, G)
        cand = (~taken | free_always) & (row >= thr) & d_valid[:, d, None, None]
        picked = np.full((B, T), -1)
        via_ignored = np.zeros((B, T), bool)
        for kind, is_ignored in ((regular, False), (ignored, True)):
            c = cand & kind[:, None, :]
            has = c.any(axis=2) & (picked < 0)
            if not has.any():
                continue
            best = G - 1 - np.argmax(np.where(c, row, -1.0)[:, :, ::-1], axis=2)  # highest IoU, ties to the later
            picked = np.where(has, best, picked)
            via_ignored |= has & is_ignored
        ok = picked >= 0
        matched[:, :, d] = ok
        on_ignored[:, :, d] = via_ignored
        taken[bi[ok], ti[ok], picked[ok]] = True
    return matched, on_ignored


def _field(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _det_arrays(det: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(xywh float64, scores float64, classes) of one image's detections: a Detections (x1y1x2y2 boxes,
    converted as CocoMetric writes them for pycocotools) or a dict with 'xywh' or 'boxes'."""
    scores = np.asarray(_field(det, "scores"), np.float64).reshape(-1)
    classes = np.asarray(_field(det, "classes"), np.int64).reshape(-1)
    xywh = _field(det, "xywh")
    if xywh is not None:
        xywh = np.asarray(xywh, np.float64).reshape(-1, 4)
    else:
        b = np.asarray(_field(det, "boxes"), np.float64).reshape(-1, 4)
        xywh = np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1)
    if not len(xywh) == len(scores) == len(classes):
        raise ValueError(
            f"detections disagree in length: {len(xywh)} boxes, {len(scores)} scores, {len(classes)} classes"
        )
    return xywh, scores, classes


def _gt_arrays(gt: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(xywh, area, iscrowd, classes) of one image's ground truth (dict: 'xywh' or 'boxes' x1y1x2y2,
    'classes', optional 'iscrowd' and 'area' (default w * h))."""
    classes = np.asarray(_field(gt, "classes"), np.int64).reshape(-1)
    xywh = _field(gt, "xywh")
    if xywh is not None:
        xywh = np.asarray(xywh, np.float64).reshape(-1, 4)
    else:
        b = np.asarray(_field(gt, "boxes"), np.float64).reshape(-1, 4)
        xywh = np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1)
    crowd = _field(gt, "iscrowd")
    crowd = np.zeros(len(classes), bool) if crowd is None else np.asarray(crowd, bool).reshape(-1)
    area = _field(gt, "area")
    area = xywh[:, 2] * xywh[:, 3] if area is None else np.asarray(area, np.float64).reshape(-1)
    if not len(xywh) == len(classes) == len(crowd) == len(area):
        raise ValueError("ground truth disagrees in length between boxes, classes, iscrowd and area")
    return xywh, area, crowd, classes


def _load(annotation: str | Path | dict[str, Any]) -> dict[str, Any]:
    return annotation if isinstance(annotation, dict) else json.loads(Path(annotation).read_text())


def _ground_truth(doc: dict[str, Any], image_ids: Sequence[int]) -> tuple[list[dict[str, Any]], list[int]]:
    """One ground-truth dict per entry of ``image_ids`` (repeats allowed) from a parsed COCO annotation
    file, objects in file order, with the file's xywh, area and iscrowd; and the sorted category ids."""
    cat_ids = sorted(int(c["id"]) for c in doc["categories"])
    to_k = {c: k for k, c in enumerate(cat_ids)}
    known = {int(im["id"]) for im in doc["images"]}
    missing = [i for i in image_ids if int(i) not in known]
    if missing:
        raise ValueError(f"image id {missing[0]} is not in the annotation file ({len(missing)} missing)")
    per_image: dict[int, list[dict[str, Any]]] = {}
    for a in doc["annotations"]:
        if int(a["category_id"]) in to_k:
            per_image.setdefault(int(a["image_id"]), []).append(a)
    gts = []
    for i in image_ids:
        anns = per_image.get(int(i), [])
        gts.append(
            {
                "xywh": np.asarray([[float(v) for v in a["bbox"]] for a in anns], np.float64).reshape(-1, 4),
                "area": np.asarray([float(a["area"]) for a in anns], np.float64),
                "iscrowd": np.asarray([bool(a.get("iscrowd", 0)) for a in anns], bool),
                "classes": np.asarray([to_k[int(a["category_id"])] for a in anns], np.int64),
                "image_id": int(i),
            }
        )
    return gts, cat_ids


class _FlatObjects(NamedTuple):
    """Every image's ground-truth objects in one flat array each, with the image each belongs to."""

    img: np.ndarray
    xywh: np.ndarray
    area: np.ndarray
    crowd: np.ndarray
    cls: np.ndarray


class _FlatDetections(NamedTuple):
    """Every image's detections in one flat array each, with their image and position in it."""

    img: np.ndarray
    xywh: np.ndarray
    score: np.ndarray
    cls: np.ndarray
    pos: np.ndarray


class _Groups(NamedTuple):
    """The (image, category) groups of the kept detections and their objects."""

    start: np.ndarray  # first position of each group in ``keep``
    num_dets: np.ndarray
    num_objects: np.ndarray
    first_object: np.ndarray  # into ``objects``
    objects: np.ndarray  # flat object indices ordered by (image, category), input order inside


def _flat(parts: list[tuple], j: int, shape: Any, dt: Any) -> np.ndarray:
    """Field ``j`` of every image's arrays concatenated, as ``dt`` (empty of ``shape`` without images)."""
    return np.concatenate([p[j] for p in parts]).astype(dt) if parts else np.zeros(shape, dt)


def _image_rank(gt_per_image: Sequence[Any]) -> np.ndarray:
    """Each image's place in pycocotools' image order: increasing id (input order when ids are missing or equal)."""
    n = len(gt_per_image)
    ids = [_field(g, "image_id") for g in gt_per_image]
    order = np.argsort(np.asarray(ids, np.int64), kind="stable") if n and None not in ids else np.arange(n)
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n)
    return rank


def _flat_objects(gt_per_image: Sequence[Any]) -> _FlatObjects:
    """The ground truth of every image (:func:`_gt_arrays`) flattened."""
    gts = [_gt_arrays(g) for g in gt_per_image]
    img = np.repeat(np.arange(len(gt_per_image)), [len(g[3]) for g in gts])
    return _FlatObjects(
        img,
        _flat(gts, 0, (0, 4), np.float64),
        _flat(gts, 1, 0, np.float64),
        _flat(gts, 2, 0, bool),
        _flat(gts, 3, 0, np.int64),
    )


def _flat_detections(dets_per_image: Sequence[Any]) -> _FlatDetections:
    """The detections of every image (:func:`_det_arrays`) flattened."""
    dts = [_det_arrays(d) for d in dets_per_image]
    img = np.repeat(np.arange(len(dets_per_image)), [len(d[2]) for d in dts])
    pos = np.concatenate([np.arange(len(d[2])) for d in dts]) if dts else np.zeros(0, np.int64)
    return _FlatDetections(
        img, _flat(dts, 0, (0, 4), np.float64), _flat(dts, 1, 0, np.float64), _flat(dts, 2, 0, np.int64), pos
    )


def _check_classes(g_cls: np.ndarray, d_cls: np.ndarray, K: int) -> None:
    """Refuse a class index outside the categories."""
    for arr, what in ((g_cls, "ground truth"), (d_cls, "detection")):
        if arr.size and (arr.min() < 0 or arr.max() >= K):
            raise ValueError(f"{what} class index outside 0..{K - 1}")


def _object_counts(g: _FlatObjects, g_ignore: np.ndarray, n: int, K: int) -> np.ndarray:
    """(images, area ranges, categories): how many objects each image has that the range does not ignore."""
    return np.stack(
        [
            np.bincount(g.img[~g_ignore[a]] * K + g.cls[~g_ignore[a]], minlength=n * K).reshape(n, K)
            for a in range(len(AREAS))
        ],
        axis=1,
    )


def _top_detections(d: _FlatDetections, d_key: np.ndarray) -> np.ndarray:
    """Indices of the detections kept, grouped by (image, category) ``d_key``: by score inside a group (stable:
    input order breaks ties), its top MAX_DETS."""
    srt = np.lexsort((d.pos, -d.score, d_key))
    d_key_s = d_key[srt]
    new = np.ones(srt.size, bool)
    new[1:] = d_key_s[1:] != d_key_s[:-1]
    starts = np.flatnonzero(new)
    within = np.arange(srt.size) - np.repeat(starts, np.diff(np.append(starts, srt.size)))
    return srt[within < MAX_DETS]


def _groups(k_key: np.ndarray, g: _FlatObjects, K: int) -> _Groups:
    """The groups of consecutive kept detections with equal (image, category) key ``k_key``, with their objects
    in input order."""
    N = k_key.size
    grp_start = np.flatnonzero(np.concatenate(([True], k_key[1:] != k_key[:-1]))) if N else np.zeros(0, np.int64)
    grp_key = k_key[grp_start]
    grp_D = np.diff(np.append(grp_start, N))
    g_key = g.img * K + g.cls
    g_sorted = np.argsort(g_key, kind="stable")
    g_lo = np.searchsorted(g_key[g_sorted], grp_key, side="left")
    grp_G = np.searchsorted(g_key[g_sorted], grp_key, side="right") - g_lo
    return _Groups(grp_start, grp_D, grp_G, g_lo, g_sorted)


def _match_bucket(
    sel: np.ndarray,
    grp: _Groups,
    kept_xywh: np.ndarray,
    g: _FlatObjects,
    g_ignore: np.ndarray,
    matched: np.ndarray,
    on_ignored: np.ndarray,
) -> None:
    """Match the groups ``sel`` as one padded batch under every area range, marking ``matched`` / ``on_ignored``
    (A, T, positions in ``keep``); ``kept_xywh``: the boxes of the kept detections."""
    Dm, Gm = int(grp.num_dets[sel].max()), int(grp.num_objects[sel].max())
    dj, gj = np.arange(Dm), np.arange(Gm)
    d_valid = dj[None, :] < grp.num_dets[sel, None]
    g_valid = gj[None, :] < grp.num_objects[sel, None]
    d_idx = np.where(d_valid, grp.start[sel, None] + dj[None, :], 0)  # into keep
    g_idx = grp.objects[np.where(g_valid, grp.first_object[sel, None] + gj[None, :], 0)]  # into the flat objects
    crowd = g.crowd[g_idx] & g_valid
    ious = bbox_iou_batched(kept_xywh[d_idx], g.xywh[g_idx], crowd)
    for a in range(len(AREAS)):
        ign = g_ignore[a][g_idx]
        m, on_ign = _greedy_match(ious, d_valid, g_valid & ~ign, g_valid & ign, crowd)
        b_i, t_i, j_i = np.nonzero(m & d_valid[:, None, :])
        matched[a, t_i, d_idx[b_i, j_i]] = True
        b_i, t_i, j_i = np.nonzero(on_ign & d_valid[:, None, :])
        on_ignored[a, t_i, d_idx[b_i, j_i]] = True


def _match(
    d: _FlatDetections, keep: np.ndarray, k_key: np.ndarray, g: _FlatObjects, g_ignore: np.ndarray, K: int
) -> tuple[np.ndarray, np.ndarray]:
    """(matched, matched to an ignored object), (A, T, kept detections): every group matched to its objects, in
    buckets of similar (detections, objects) counts to keep padding small."""
    N = keep.size
    matched = np.zeros((len(AREAS), IOU_THRESHOLDS.size, N), bool)
    on_ignored = np.zeros((len(AREAS), IOU_THRESHOLDS.size, N), bool)
    grp = _groups(k_key, g, K)
    bucket = np.ceil(np.log2(np.maximum(grp.num_dets, 1))).astype(int) * 64 + np.ceil(
        np.log2(np.maximum(grp.num_objects, 1))
    ).astype(int)
    kept_xywh = d.xywh[keep]
    for bk in np.unique(bucket[grp.num_objects > 0]):
        sel = np.flatnonzero((bucket == bk) & (grp.num_objects > 0))
        _match_bucket(sel, grp, kept_xywh, g, g_ignore, matched, on_ignored)
    return matched, on_ignored


def _true_false_positives(
    matched: np.ndarray, on_ignored: np.ndarray, kept_xywh: np.ndarray, ranges: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(true positives, false positives), (A, T, N): a detection matched to an ignored object, or unmatched and
    outside the area range, is neither."""
    d_area = kept_xywh[:, 2] * kept_xywh[:, 3]
    d_out = (d_area[None, :] < ranges[:, :1]) | (d_area[None, :] > ranges[:, 1:])  # (A, N)
    dt_ignore = on_ignored | (~matched & d_out[:, None, :])
    return matched & ~dt_ignore, ~matched & ~dt_ignore


class CocoMatcher:
    """Per-image COCO matching done once; AP of the full set or of any resample of images.

    ``gt_per_image``: one dict per image with 'classes' (indices into ``categories``), 'xywh' (COCO boxes)
    or 'boxes' (x1y1x2y2, the COCO loader's labels), optional 'iscrowd', 'area' and 'image_id'.
    ``dets_per_image``: one Detections (x1y1x2y2 boxes, scores, class indices) or dict per image, same
    order. ``categories``: the category ids (or their number); class index k is ``categories[k]``, and every
    category is evaluated (those without objects in a resample are left out of its mean, as in COCO).
    """

    def __init__(self, gt_per_image: Sequence[Any], dets_per_image: Sequence[Any], categories: Sequence[int] | int):
        if len(gt_per_image) != len(dets_per_image):
            raise ValueError(f"{len(gt_per_image)} ground-truth entries but {len(dets_per_image)} detection entries")
        self.num_images = n = len(gt_per_image)
        self.num_categories = K = categories if isinstance(categories, int) else len(categories)
        self.rank = _image_rank(gt_per_image)
        ranges = np.asarray([AREA_RANGES[a] for a in AREAS])
        g, d = _flat_objects(gt_per_image), _flat_detections(dets_per_image)
        _check_classes(g.cls, d.cls, K)
        # Objects: ignored per area range (crowd, or area outside the range); counts of the others.
        g_ignore = g.crowd[None, :] | (g.area[None, :] < ranges[:, :1]) | (g.area[None, :] > ranges[:, 1:])  # (A, G)
        self.npig_image = _object_counts(g, g_ignore, n, K)
        d_key = d.img * K + d.cls
        keep = _top_detections(d, d_key)  # grouped by (image, category), score order inside
        matched, on_ignored = _match(d, keep, d_key[keep], g, g_ignore, K)
        tp, fp = _true_false_positives(matched, on_ignored, d.xywh[keep], ranges)
        self._store_in_accumulate_order(d, keep, tp, fp)

    def _store_in_accumulate_order(self, d: _FlatDetections, keep: np.ndarray, tp: np.ndarray, fp: np.ndarray) -> None:
        """Keep the kept detections' image, category, score, tp and fp in pycocotools' accumulate order, and their
        tie groups."""
        img, k, score, pos = d.img[keep], d.cls[keep], d.score[keep], d.pos[keep]
        # Category, then score (high first), then image order, then position in the image: pycocotools' order.
        srt = np.lexsort((pos, self.rank[img], -score, k))
        self.det_image, self.det_category, self.det_score = img[srt], k[srt], score[srt]
        self.tp, self.fp = np.ascontiguousarray(tp[:, :, srt]), np.ascontiguousarray(fp[:, :, srt])  # (A, T, N)
        # Tie groups: detections of one image and category with equal scores (their copies interleave).
        new = np.ones(srt.size, bool)
        new[1:] = (np.diff(self.det_category) != 0) | (np.diff(self.det_score) != 0) | (np.diff(self.det_image) != 0)
        self.det_group = np.cumsum(new) - 1
        self._tied = np.bincount(self.det_group)[self.det_group] > 1 if srt.size else np.zeros(0, bool)

    @classmethod
    def from_coco(
        cls,
        annotation: str | Path | dict[str, Any],
        results: Sequence[dict[str, Any]],
        image_ids: Sequence[int] | None = None,
    ) -> CocoMatcher:
        """From a COCO annotation file (or its parsed dict) and results in COCO's format, over ``image_ids``
        (default: every image in the file), exactly as pycocotools would read them (one entry per distinct
        id, in increasing id order)."""
        doc = _load(annotation)
        ids = sorted({int(i) for i in (image_ids if image_ids is not None else [im["id"] for im in doc["images"]])})
        gts, cat_ids = _ground_truth(doc, ids)
        to_k = {c: k for k, c in enumerate(cat_ids)}
        where = {i: j for j, i in enumerate(ids)}
        known = {int(im["id"]) for im in doc["images"]}
        dets: list[dict[str, list]] = [{"xywh": [], "scores": [], "classes": []} for _ in ids]
        for r in results:
            if int(r["image_id"]) not in known:
                raise ValueError(f"result for image {r['image_id']}, which the annotation file does not list")
            j = where.get(int(r["image_id"]))
            if j is None or int(r["category_id"]) not in to_k:
                continue
            d = dets[j]
            d["xywh"].append([float(v) for v in r["bbox"]])
            d["scores"].append(float(r["score"]))
            d["classes"].append(to_k[int(r["category_id"])])
        det_arrays = [
            {
                "xywh": np.asarray(d["xywh"], np.float64).reshape(-1, 4),
                "scores": np.asarray(d["scores"], np.float64),
                "classes": np.asarray(d["classes"], np.int64),
            }
            for d in dets
        ]
        return cls(gts, det_arrays, cat_ids)

    @classmethod
    def for_images(
        cls, annotation: str | Path | dict[str, Any], image_ids: Sequence[int], dets_per_image: Sequence[Any]
    ) -> CocoMatcher:
        """Detections of stored images (one Detections per entry of ``image_ids``, class indices into the
        file's sorted category ids, as the COCO loader numbers them) against the annotation file's own
        boxes and areas: ``ap()`` then equals CocoMetric / coco_evaluate on the same images (when the ids
        are distinct; a repeated id is a separate image here)."""
        doc = _load(annotation)
        gts, cat_ids = _ground_truth(doc, [int(i) for i in image_ids])
        return cls(gts, dets_per_image, cat_ids)

    def counts(self, indices: np.ndarray | Sequence[int] | None = None) -> np.ndarray:
        """How often each image is drawn: ones for the full set, else bincount of ``indices``."""
        if indices is None:
            return np.ones(self.num_images, np.int64)
        idx = np.asarray(indices, np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_images):
            raise IndexError(f"image index outside 0..{self.num_images - 1}")
        return np.bincount(idx, minlength=self.num_images)

    def _expand(self, w: np.ndarray) -> np.ndarray:
        """Detection positions of a resample, with repeats, in pycocotools' order for the copies."""
        wd = w[self.det_image]
        sel = np.flatnonzero(wd)
        reps = wd[sel]
        e = np.repeat(sel, reps)
        if np.any((reps > 1) & self._tied[sel]):  # copies of tied detections interleave: reorder them
            copy = np.arange(e.size) - np.repeat(np.cumsum(reps) - reps, reps)
            e = e[np.argsort(self.det_group[e] * (int(reps.max()) + 1) + copy, kind="stable")]
        return e

    def precision(
        self, indices: np.ndarray | Sequence[int] | None = None, areas: Sequence[str] = AREAS
    ) -> tuple[np.ndarray, np.ndarray]:
        """pycocotools' ``eval['precision'][:, :, :, a, maxDets=100]`` for each area range asked:
        (len(areas), T, R, K), -1 for categories without non-ignored objects; and the object counts
        (len(areas), K)."""
        w = self.counts(indices)
        a_idx = [AREAS.index(a) for a in areas]
        npig = np.einsum("i,iak->ak", w, self.npig_image[:, a_idx, :])
        e = self._expand(w)
        T, K = IOU_THRESHOLDS.size, self.num_categories
        out = np.zeros((len(a_idx), T, K, _R))
        if e.size:
            kd = self.det_category[e]
            first = np.ones(e.size, bool)
            first[1:] = kd[1:] != kd[:-1]
            starts = np.flatnonzero(first)  # one segment per category present, in category order
            seg = np.cumsum(first) - 1
            seg_k = kd[starts]
            S = starts.size
            for j, a in enumerate(a_idx):
                # Only true positives matter: precision at a recall level peaks where that level is
                # reached (later detections add false positives or nothing), and positions before the
                # first true positive have recall 0 and precision 0.
                t_i, p_i = np.nonzero(self.tp[a][:, e])  # sorted by threshold, then position
                if t_i.size == 0:
                    continue
                fp_cum = np.cumsum(self.fp[a][:, e], axis=1, dtype=np.int32)
                fp_base = np.concatenate([np.zeros((T, 1), np.int32), fp_cum[:, starts[1:] - 1]], axis=1)
                s_i = seg[p_i]
                group = t_i * S + s_i
                new_g = np.ones(group.size, bool)
                new_g[1:] = group[1:] != group[:-1]
                g_start = np.flatnonzero(new_g)
                tp_n = np.arange(1, group.size + 1) - np.repeat(g_start, np.diff(np.append(g_start, group.size)))
                fp_n = fp_cum[t_i, p_i] - fp_base[t_i, s_i]
                k_i = seg_k[s_i]
                rc = tp_n / npig[j][k_i]  # a true positive implies an object of its category: never / 0
                pr = tp_n / (fp_n + tp_n + _EPS)
                # Precision at recall threshold r = max precision where recall >= r: reduce per recall bin.
                key = (t_i * K + k_i) * _R + np.searchsorted(RECALL_THRESHOLDS, rc, side="right") - 1
                run = np.flatnonzero(np.concatenate(([True], key[1:] != key[:-1])))  # key is nondecreasing
                dense = np.zeros(T * K * _R)
                dense[key[run]] = np.maximum.reduceat(pr, run)
                dense = dense.reshape(T, K, _R)
                out[j] = np.maximum.accumulate(dense[..., ::-1], axis=-1)[..., ::-1]
        prec = out.transpose(0, 1, 3, 2).copy()  # (areas, T, R, K) as pycocotools
        prec[np.broadcast_to((npig == 0)[:, None, None, :], prec.shape)] = -1.0
        return prec, npig

    def ap(
        self, indices: np.ndarray | Sequence[int] | None = None, stats: Sequence[str] = COCO_STATS
    ) -> dict[str, float]:
        """COCO AP figures (pycocotools' summarize() 0-5 under ``COCO_STATS`` names) of all images, or of the
        resample ``indices`` (image indices, repeats allowed: an image drawn k times counts as k images).
        -1 where no category has an object in that area range (pycocotools' convention). Ask for fewer
        ``stats`` to save time (mAP/AP50/AP75 need one area range, each of the others one more)."""
        unknown = [s for s in stats if s not in _STAT_AREA]
        if unknown:
            raise ValueError(f"unknown COCO stats {unknown}; known: {COCO_STATS}")
        areas = [a for a in AREAS if any(_STAT_AREA[s] == a for s in stats)]
        prec, _ = self.precision(indices, areas)
        out = {}
        for s in stats:
            p = prec[areas.index(_STAT_AREA[s])]
            if s in _STAT_IOU:
                p = p[np.where(_STAT_IOU[s] == IOU_THRESHOLDS)[0]]
            valid = p[p > -1]
            out[s] = float(np.mean(valid)) if valid.size else -1.0
        return out

    def bootstrap(self, resamples: int = 200, seed: int = 0, stat: str = "mAP") -> np.ndarray:
        """``stat`` on ``resamples`` bootstrap resamples of the images (uniform, with replacement)."""
        rng = np.random.default_rng(seed)
        return np.array(
            [self.ap(rng.integers(0, self.num_images, self.num_images), (stat,))[stat] for _ in range(resamples)]
        )
