"""Tasks: what a model's outputs mean and how they are scored (classification, detection).

A :class:`Task` owns everything eval, sign-off, sensitivity and reports would otherwise branch on: how one
batch of raw outputs becomes per-image arrays (the same arrays sign-off stores in its chunks), the metrics
computed from those arrays, the row fields with their differences to the reference, the table columns, the
metrics a gate may name, and the paired per-image data behind a gate's interval.

Per-image arrays are plain numpy arrays whose first axis is the image; a task with a variable number of
items per image (detections) stores them flat with a per-image count, so arrays of batches and chunks are
joined by concatenation alone (:func:`concat`).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import numpy as np

from quantship.data.detection import Detections
from quantship.errors import ConfigError, DataError
from quantship.evaluate.detection_metrics import metric_for
from quantship.evaluate.results import Columns
from quantship.models.ssd import anchors_for, make_anchors, postprocess

Arrays = dict[str, np.ndarray]


@dataclass
class PairedSample:
    """Target and reference on the same images, for one metric: what a gate's interval is computed from.

    Exactly one of ``per_image`` (paired per-image values whose mean is the metric: classification's 0/1
    correctness) and ``resample`` (the metric of target and reference over a resample of image indices:
    detection's mAP, which is not a mean over images) is set.
    """

    metric: str
    target: float
    reference: float
    images: int
    per_image: tuple[np.ndarray, np.ndarray] | None = None
    resample: Callable[[np.ndarray], tuple[float, float]] | None = None


def concat(parts: Sequence[Arrays]) -> Arrays:
    """Per-image arrays of consecutive batches or chunks joined into one set."""
    parts = [p for p in parts if p]
    if not parts:
        return {}
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


class Task(abc.ABC):
    """How one kind of model output is scored."""

    name: ClassVar[str]
    metrics: ClassVar[tuple[str, ...]]  # what gates may name, in order of importance
    columns: ClassVar[Columns]  # eval table columns
    report_columns: ClassVar[Columns]  # accuracy columns a report shows for this task

    @property
    def primary(self) -> str:
        return self.metrics[0]

    @abc.abstractmethod
    def score(self, outputs: np.ndarray, batch: Any) -> Arrays:
        """Per-image arrays from one batch's first output (images x views flattened, as fed)."""

    @abc.abstractmethod
    def evaluate(self, arrays: Arrays, keys: Sequence[str]) -> dict[str, Any]:
        """The task's metrics over stored per-image arrays (``keys`` name the images, in order)."""

    def agreement(self, arrays: Arrays, reference: Arrays) -> dict[str, float]:
        """Per-image agreement figures with the reference target (none by default)."""
        return {}

    @abc.abstractmethod
    def paired(self, metric: str, arrays: Arrays, reference: Arrays, keys: Sequence[str]) -> PairedSample:
        """Target vs reference on ``metric`` over the same images (``keys``), for a gate."""

    def check_metric(self, metric: str, where: str = "gate") -> None:
        if metric not in self.metrics:
            raise ConfigError(
                f"{where}: metric '{metric}' is not measured for {self.name} (choose one of: {', '.join(self.metrics)})"
            )

    @abc.abstractmethod
    def empty(self) -> Arrays:
        """Per-image arrays of no image (a chunk whose images were all unreadable)."""

    def fields(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Flat row fields of a target's metrics: every scalar metric."""
        return {k: v for k, v in metrics.items() if not isinstance(v, dict)}

    def row(self, metrics: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
        """Row fields with the difference to the reference for each gate metric."""
        out = self.fields(metrics)
        for m in self.metrics:
            out[f"delta_{m}"] = metrics[m] - reference[m]
        return out

    @staticmethod
    def count(arrays: Arrays) -> int:
        return len(arrays["keys"]) if arrays else 0


class ClassificationTask(Task):
    """Class scores (averaged over the views of multi-crop evaluation); top-1 and top-5 accuracy.

    Args:
        keep_scores: Also store every image's score vector (``scores``): the demo's prediction check.
    """

    name = "classification"
    metrics = ("top1", "top5")
    columns = (
        ("target", "target", "{}"),
        ("images", "images", "{}"),
        ("top1", "top-1", "{:.4f}"),
        ("delta_top1", "Δ top-1", "{:+.4f}"),
        ("top5", "top-5", "{:.4f}"),
        ("delta_top5", "Δ top-5", "{:+.4f}"),
        ("agreement_top1", "agree top-1", "{:.4f}"),
        ("latency_ms", "ms/image", "{:.2f}"),
        ("size_mb", "size MB", "{:.2f}"),
    )
    report_columns = (("top1", "top-1", "{:.4f}"), ("top5", "top-5", "{:.4f}"), ("delta_top1", "Δ top-1", "{:+.4f}"))

    def __init__(self, keep_scores: bool = False):
        self.keep_scores = keep_scores

    def scores(self, outputs: np.ndarray, images: int) -> np.ndarray:
        """(images x views, C) -> (images, C), averaged over the views."""
        return np.asarray(outputs).reshape(images, -1, np.asarray(outputs).shape[-1]).mean(axis=1)

    def score(self, outputs: np.ndarray, batch: Any) -> Arrays:
        scores = self.scores(outputs, len(batch.keys))
        labels = np.asarray(batch.labels, dtype=np.int64).reshape(-1)
        k = min(5, scores.shape[1])
        # An image whose scores hold NaN or inf predicts nothing (class -1, wrong): argsort would otherwise rank
        # the NaNs and report some class, usually 0, as the prediction.
        finite = np.isfinite(scores).all(axis=1)
        # argsort on negated scores is stable: ties keep the lower class index first, for every runtime.
        order = np.argsort(-np.where(finite[:, None], scores, 0), axis=1, kind="stable")[:, :k]
        order[~finite] = -1
        out = {
            "keys": np.asarray(batch.keys, dtype=str),
            "pred": order[:, 0].astype(np.int64),
            "correct1": order[:, 0] == labels,
            "correct5": (order == labels[:, None]).any(axis=1),
        }
        if self.keep_scores:
            out["scores"] = scores.astype(np.float32)
        return out

    def empty(self) -> Arrays:
        out = {
            "keys": np.zeros(0, dtype=str),
            "pred": np.zeros(0, np.int64),
            "correct1": np.zeros(0, bool),
            "correct5": np.zeros(0, bool),
        }
        if self.keep_scores:
            out["scores"] = np.zeros((0, 0), np.float32)
        return out

    def evaluate(self, arrays: Arrays, keys: Sequence[str]) -> dict[str, Any]:
        n = self.count(arrays)
        if not n:
            return {"top1": float("nan"), "top5": float("nan")}
        return {"top1": float(arrays["correct1"].mean()), "top5": float(arrays["correct5"].mean())}

    def agreement(self, arrays: Arrays, reference: Arrays) -> dict[str, float]:
        t, r = _align(arrays, reference)
        agree = float(np.mean(arrays["pred"][t] == reference["pred"][r])) if len(t) else float("nan")
        return {"agreement_top1": agree}

    def paired(self, metric: str, arrays: Arrays, reference: Arrays, keys: Sequence[str]) -> PairedSample:
        self.check_metric(metric)
        flag = {"top1": "correct1", "top5": "correct5"}[metric]
        t, r = _align(arrays, reference)
        tv, rv = arrays[flag][t].astype(np.float64), reference[flag][r].astype(np.float64)
        return PairedSample(metric, float(tv.mean()), float(rv.mean()), len(t), per_image=(tv, rv))


class DetectionTask(Task):
    """Raw SSD head outputs -> detections (one numpy post-processing for every runtime) -> mAP.

    Args:
        meta: The dataset's meta (classes; COCO annotation file and category ids).
        labels: Ground truth per image key.
        anchors: The model's anchor configuration (:class:`quantship.models.ssd.AnchorConfig`); needed only
            to score raw outputs, not to evaluate stored detections.
    """

    name = "detection"
    metrics = ("mAP",)
    columns = (
        ("target", "target", "{}"),
        ("images", "images", "{}"),
        ("mAP", "mAP", "{:.4f}"),
        ("delta_mAP", "Δ mAP", "{:+.4f}"),
        ("mAP_allpoint", "mAP (all-point)", "{:.4f}"),
        ("AP50", "AP50", "{:.4f}"),
        ("AP75", "AP75", "{:.4f}"),
        ("latency_ms", "ms/image", "{:.2f}"),
        ("size_mb", "size MB", "{:.2f}"),
    )
    report_columns = (("mAP", "mAP", "{:.4f}"), ("delta_mAP", "Δ mAP", "{:+.4f}"))

    def __init__(self, meta: dict[str, Any], labels: dict[str, Any], anchors: Any = None):

        self.meta, self.labels, self.anchors_cfg = meta, labels, anchors
        self.anchors = make_anchors(anchors) if anchors is not None else None

    def score(self, outputs: np.ndarray, batch: Any) -> Arrays:

        if self.anchors is None:
            raise ConfigError("scoring detections needs the model's anchor configuration")

        # Outputs with NaN or inf detect nothing (the loop counts those images).
        dets = [
            postprocess(o, self.anchors, self.anchors_cfg, (lab["width"], lab["height"]))
            if np.isfinite(o).all()
            else Detections.empty()
            for o, lab in zip(outputs, batch.labels)
        ]
        if not dets:
            return self.empty()
        return {
            "keys": np.asarray(batch.keys, dtype=str),
            "det_count": np.asarray([len(d.scores) for d in dets], np.int64),
            "det_boxes": np.concatenate([d.boxes for d in dets]).reshape(-1, 4).astype(np.float32),
            "det_scores": np.concatenate([d.scores for d in dets]).astype(np.float32),
            "det_classes": np.concatenate([d.classes for d in dets]).astype(np.int64),
        }

    def empty(self) -> Arrays:
        return {
            "keys": np.zeros(0, dtype=str),
            "det_count": np.zeros(0, np.int64),
            "det_boxes": np.zeros((0, 4), np.float32),
            "det_scores": np.zeros(0, np.float32),
            "det_classes": np.zeros(0, np.int64),
        }

    def detections(self, arrays: Arrays) -> list[Any]:
        """Stored flat detections back to one :class:`Detections` per image."""

        cuts = np.cumsum(arrays["det_count"])[:-1]
        return [
            Detections(b, s, c)
            for b, s, c in zip(
                np.split(arrays["det_boxes"], cuts),
                np.split(arrays["det_scores"], cuts),
                np.split(arrays["det_classes"], cuts),
            )
        ]

    def ground_truth(self, keys: Sequence[str]) -> list[dict[str, Any]]:
        try:
            return [self.labels[str(k)] for k in keys]
        except KeyError as exc:
            raise DataError(f"stored detections name image {exc} that the dataset does not hold") from None

    def metric_on(
        self, dets: Sequence[Any], labels: Sequence[dict[str, Any]], images: np.ndarray | None = None
    ) -> dict[str, Any]:
        """mAP (and COCO's figures) over all images or the given image indices."""

        idx = range(len(dets)) if images is None else images
        metric = metric_for(self.meta)
        metric.update([dets[i] for i in idx], [labels[i] for i in idx])
        return metric.result()

    def evaluate(self, arrays: Arrays, keys: Sequence[str]) -> dict[str, Any]:
        if not self.count(arrays):
            return {"mAP": float("nan")}
        return self.metric_on(self.detections(arrays), self.ground_truth(keys))

    def paired(self, metric: str, arrays: Arrays, reference: Arrays, keys: Sequence[str]) -> PairedSample:
        self.check_metric(metric)
        if list(arrays["keys"]) != list(reference["keys"]):
            raise DataError("evaluated images differ from the reference's; cannot pair them")
        labels = self.ground_truth(keys)
        dets, ref_dets = self.detections(arrays), self.detections(reference)
        if self.meta.get("metric") == "coco":
            # COCO AP by our own matcher (equal to pycocotools): the annotations are read once, and an image drawn
            # twice in a resample is two images with their own objects (pycocotools would merge them by id).
            from quantship.evaluate.coco_ap import CocoMatcher

            ids = [int(lab["image_id"]) for lab in labels]
            ann = self.meta["annotation_file"]
            target_m, ref_m = CocoMatcher.for_images(ann, ids, dets), CocoMatcher.for_images(ann, ids, ref_dets)

            def resample(idx: np.ndarray | None) -> tuple[float, float]:
                return target_m.ap(idx, ("mAP",))["mAP"], ref_m.ap(idx, ("mAP",))["mAP"]
        else:

            def resample(idx: np.ndarray | None) -> tuple[float, float]:
                return self.metric_on(dets, labels, idx)["mAP"], self.metric_on(ref_dets, labels, idx)["mAP"]

        tv, rv = resample(None)
        return PairedSample(metric, tv, rv, len(dets), resample=resample)

    def fields(self, metrics: dict[str, Any]) -> dict[str, Any]:
        return {**super().fields(metrics), "per_class_ap": metrics.get("per_class_ap")}


def _align(arrays: Arrays, reference: Arrays) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the images both sets hold, paired by key (a target may skip what the reference read)."""
    if len(arrays["keys"]) == len(reference["keys"]) and np.array_equal(arrays["keys"], reference["keys"]):
        idx = np.arange(len(arrays["keys"]))
        return idx, idx
    _, t, r = np.intersect1d(arrays["keys"], reference["keys"], return_indices=True)
    return t, r


_TASKS: dict[str, Callable[..., Task]] = {}


_METRICS: dict[str, tuple[str, ...]] = {}


def register_task(name: str, factory: Callable[..., Task], metrics: tuple[str, ...] = ()) -> None:
    """Register how a task is made for a dataset: ``factory(dataset, loaded, anchors_file) -> Task``, and the
    metrics its gates may name."""
    _TASKS[name] = factory
    _METRICS[name] = tuple(metrics)


def task_metrics(name: str) -> tuple[str, ...]:
    """The metrics a gate may name for a task (to check a plan before any work)."""
    return _METRICS.get(name, ())


def make_task(dataset: Any, loaded: Any = None, anchors_file: str | None = None, **kwargs: Any) -> Task:
    """The task of a dataset (its loader declares it), bound to the dataset and, when given, the model (without
    one it can evaluate stored per-image arrays but not score raw outputs)."""
    if dataset.task not in _TASKS:
        raise ConfigError(f"no task '{dataset.task}'; known: {', '.join(_TASKS)}")
    return _TASKS[dataset.task](dataset, loaded, anchors_file, **kwargs)


def _classification(dataset: Any, loaded: Any, anchors_file: str | None, **kwargs: Any) -> Task:
    if loaded is not None:
        check_class_outputs(dataset, loaded)
    return ClassificationTask(**kwargs)


def check_class_outputs(dataset: Any, loaded: Any) -> None:
    """Refuse a classifier with fewer outputs than the dataset has classes: the images of the classes it cannot
    name would be scored as its mistakes, quietly (a 10-class head on ImageNet, a dataset of another model).

    Raises:
        DataError: Naming the model's output width and the dataset's highest label.
    """
    try:
        width = int(loaded.model.outputs[0].shape[-1])
    except (AttributeError, IndexError, TypeError):
        return  # a model without a static output width: nothing to compare
    labels = [s.label for s in dataset.samples if isinstance(s.label, (int, np.integer))]
    top = max(labels, default=-1)
    if top >= width:
        raise DataError(
            f"{loaded.name} has {width} outputs (classes 0..{width - 1}), but {dataset.source} holds labels up to "
            f"{top}: the model cannot predict those classes; evaluate it on data of its own classes"
        )


def _detection(dataset: Any, loaded: Any, anchors_file: str | None, **kwargs: Any) -> Task:

    anchors = anchors_for(loaded, dataset, anchors_file) if loaded is not None else None
    return DetectionTask(dataset.meta, {s.key: s.label for s in dataset.samples}, anchors)


register_task("classification", _classification, ClassificationTask.metrics)
register_task("detection", _detection, DetectionTask.metrics)
