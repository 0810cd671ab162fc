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
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import numpy as np

from quantship.config import Gate
from quantship.data.detection import Detections
from quantship.errors import ConfigError, DataError
from quantship.evaluate.coco_ap import CocoMatcher
from quantship.evaluate.detection_metrics import VocMetric, metric_for
from quantship.evaluate.results import Columns
from quantship.models.ssd import anchors_for, make_anchors, postprocess

Arrays = dict[str, np.ndarray]

# KL(reference || target) of probability vectors: int8 softmax outputs exact zeros, so both vectors are clipped at
# this floor and renormalised before the logarithm (a zero would otherwise make the divergence infinite).
KL_EPSILON = 1e-6
# Version of the per-image arrays a task stores (part of every stored chunk's key: chunks of an older layout are
# never read as if they held the new arrays).
ARRAYS_VERSION = 2


@dataclass(frozen=True)
class MetricSpec:
    """A metric a gate may name: what it measures, which way is better, its range and whether it needs labels.

    Attributes:
        name: As gates and rows name it.
        higher_is_better: False for distances (gated with ``max:``); True for accuracies and agreements
            (gated with ``relative``, ``max_drop_points`` or ``min:``).
        labelled: Needs ground truth; False for the label-free metrics (agreement with the reference,
            distances between output distributions), which ``images:`` data can give.
        low: Smallest value the metric can take.
        high: Largest value (``math.inf`` when unbounded).
        unit: What a min / max threshold and the metric's interval are expressed in.
        reference_value: The reference's own value when it is fixed by definition (agreement with itself 1.0,
            distance to itself 0.0); None when it is measured.
        about: One line for docs and messages.
    """

    name: str
    higher_is_better: bool = True
    labelled: bool = True
    low: float = 0.0
    high: float = 1.0
    unit: str = "fraction"
    reference_value: float | None = None
    about: str = ""


@dataclass
class PairedSample:
    """Target and reference on the same images, for one metric: what a gate's interval is computed from.

    Exactly one of these is set:

    * ``per_image``: paired per-image 0/1 values whose mean is the metric (classification's correctness);
    * ``values``: the target's per-image values whose mean is the metric, against a reference whose value is
      fixed by definition (agreement with the reference: 0/1, ``binary``; distances to it: continuous);
    * ``resample``: the metric of target and reference over a resample of image indices (mAP, pseudo-mAP:
      not a mean over images).
    """

    metric: str
    target: float
    reference: float
    images: int
    per_image: tuple[np.ndarray, np.ndarray] | None = None
    resample: Callable[[np.ndarray], tuple[float, float]] | None = None
    values: np.ndarray | None = None
    binary: bool = False
    unit: str = "fraction"


def concat(parts: Sequence[Arrays]) -> Arrays:
    """Per-image arrays of consecutive batches or chunks joined into one set."""
    parts = [p for p in parts if p]
    if not parts:
        return {}

    def join(arrays: list[np.ndarray]) -> np.ndarray:
        # A part of no image (a chunk whose images were all unreadable) holds per-image vectors of another
        # trailing shape (no class count yet): it adds no row, so it is left out of those.
        if any(a.ndim > 1 for a in arrays):
            arrays = [a for a in arrays if len(a)] or arrays[:1]
        return np.concatenate(arrays)

    return {k: join([p[k] for p in parts]) for k in parts[0]}


class Task(abc.ABC):
    """How one kind of model output is scored."""

    name: ClassVar[str]
    metric_specs: ClassVar[tuple[MetricSpec, ...]]  # what gates may name, in order of importance
    columns: ClassVar[Columns]  # eval table columns
    report_columns: ClassVar[Columns]  # accuracy columns a report shows for this task
    labelled: bool = True  # the data has ground truth: labelled metrics can be measured

    @property
    def metrics(self) -> tuple[str, ...]:
        """Every metric a gate may name for this task (labelled or not)."""
        return tuple(m.name for m in self.metric_specs)

    @property
    def measured(self) -> tuple[str, ...]:
        """The metrics this task's data can give (without labels: only the label-free ones)."""
        return tuple(m.name for m in self.metric_specs if self.labelled or not m.labelled)

    @property
    def primary(self) -> str:
        """The metric sensitivity ranks by and reports lead with: the first one the data can give."""
        return self.measured[0]

    def spec(self, metric: str) -> MetricSpec:
        self.check_metric(metric)
        return next(m for m in self.metric_specs if m.name == metric)

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
    def paired(
        self, metric: str, arrays: Arrays, reference: Arrays, keys: Sequence[str], **options: Any
    ) -> PairedSample:
        """Target vs reference on ``metric`` over the same images (``keys``), for a gate; ``options`` are the
        gate's settings of the metric (``score_threshold`` of ``pseudo_map``)."""

    def check_metric(self, metric: str, where: str = "gate") -> None:
        if metric not in self.metrics:
            raise ConfigError(
                f"{where}: metric '{metric}' is not measured for {self.name} (choose one of: {', '.join(self.metrics)})"
            )
        if metric not in self.measured:
            raise ConfigError(
                f"{where}: metric '{metric}' needs labels and the data has none (label-free: "
                f"{', '.join(self.measured)})"
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
            if m in metrics and m in reference:
                out[f"delta_{m}"] = metrics[m] - reference[m]
        return out

    @staticmethod
    def count(arrays: Arrays) -> int:
        return len(arrays["keys"]) if arrays else 0


CLASSIFICATION_METRICS = (
    MetricSpec("top1", about="top-1 accuracy against the labels"),
    MetricSpec("top5", about="top-5 accuracy against the labels"),
    MetricSpec(
        "agreement_top1", labelled=False, reference_value=1.0, about="share of images whose top-1 is the reference's"
    ),
    MetricSpec(
        "agreement_top5",
        labelled=False,
        reference_value=1.0,
        about="share of images whose top-5 holds the reference's top-1",
    ),
    MetricSpec(
        "mean_l1",
        higher_is_better=False,
        labelled=False,
        high=2.0,
        unit="L1 distance",
        reference_value=0.0,
        about="mean over images of the L1 distance between the target's and the reference's probability vectors",
    ),
    MetricSpec(
        "mean_kl",
        higher_is_better=False,
        labelled=False,
        high=math.inf,
        unit="nats",
        reference_value=0.0,
        about=f"mean over images of KL(reference || target) of the probability vectors (clipped at {KL_EPSILON:g})",
    ),
)


def as_probabilities(scores: np.ndarray) -> np.ndarray:
    """Class scores as probability vectors: kept as given when they already are (every value in [0, 1], every
    row summing to at most ~1: a softmax output, an int8 one whose small entries rounded to 0 included),
    a softmax of them otherwise (logits). Rows holding NaN or inf become zero vectors (they predict nothing)."""
    x = np.asarray(scores, dtype=np.float64)
    finite = np.isfinite(x).all(axis=1)
    xf = np.where(finite[:, None], x, 0.0)
    probs = bool(((xf >= -1e-6) & (xf <= 1.0 + 1e-3)).all() and (xf.sum(axis=1) <= 1.05).all())
    if not probs:
        e = np.exp(xf - xf.max(axis=1, keepdims=True))
        xf = e / e.sum(axis=1, keepdims=True)
    xf[~finite] = 0.0
    return np.clip(xf, 0.0, None)


def l1_distance(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Per-image L1 distance of probability vectors (rows); in [0, 2]."""
    return np.abs(np.asarray(p, np.float64) - np.asarray(q, np.float64)).sum(axis=1)


def kl_divergence(p: np.ndarray, q: np.ndarray, eps: float = KL_EPSILON) -> np.ndarray:
    """Per-image KL(p || q) in nats of probability vectors (rows): p is the reference, q the target. Both are
    clipped at ``eps`` and renormalised first, so an exact zero in an int8 output costs log(p / eps), not inf."""
    p = np.clip(np.asarray(p, np.float64), eps, None)
    q = np.clip(np.asarray(q, np.float64), eps, None)
    p, q = p / p.sum(axis=1, keepdims=True), q / q.sum(axis=1, keepdims=True)
    return (p * (np.log(p) - np.log(q))).sum(axis=1)


class ClassificationTask(Task):
    """Class scores (averaged over the views of multi-crop evaluation); top-1 and top-5 accuracy against the
    labels, and the label-free agreement and distances against the reference target's outputs.

    Per image it stores the top-5 classes and the probability vector (float16: 2 bytes per class and image; its
    rounding moves an L1 distance by at most ~1e-3), which the distances need.

    Args:
        keep_scores: Also store every image's score vector (``scores``, float32): the demo's prediction check.
        labelled: The data has ground truth (False for ``images:``): correctness is stored only then.
    """

    name = "classification"
    metric_specs = CLASSIFICATION_METRICS
    columns = (
        ("target", "target", "{}"),
        ("images", "images", "{}"),
        ("top1", "top-1", "{:.4f}"),
        ("delta_top1", "Δ top-1", "{:+.4f}"),
        ("top5", "top-5", "{:.4f}"),
        ("delta_top5", "Δ top-5", "{:+.4f}"),
        ("agreement_top1", "agree top-1", "{:.4f}"),
        ("mean_l1", "mean L1", "{:.4f}"),
        ("latency_ms", "ms/image", "{:.2f}"),
        ("size_mb", "size MB", "{:.2f}"),
    )
    report_columns = (
        ("top1", "top-1", "{:.4f}"),
        ("top5", "top-5", "{:.4f}"),
        ("delta_top1", "Δ top-1", "{:+.4f}"),
        ("agreement_top1", "agree top-1", "{:.4f}"),
        ("mean_l1", "mean L1", "{:.4f}"),
    )

    def __init__(self, keep_scores: bool = False, labelled: bool = True):
        self.keep_scores = keep_scores
        self.labelled = labelled

    def scores(self, outputs: np.ndarray, images: int) -> np.ndarray:
        """(images x views, C) -> (images, C), averaged over the views."""
        return np.asarray(outputs).reshape(images, -1, np.asarray(outputs).shape[-1]).mean(axis=1)

    def score(self, outputs: np.ndarray, batch: Any) -> Arrays:
        scores = self.scores(outputs, len(batch.keys))
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
            "top5": order.astype(np.int64),
            "probs": as_probabilities(scores).astype(np.float16),
        }
        if self.labelled:
            labels = np.asarray(batch.labels, dtype=np.int64).reshape(-1)
            out["correct1"] = order[:, 0] == labels
            out["correct5"] = (order == labels[:, None]).any(axis=1)
        if self.keep_scores:
            out["scores"] = scores.astype(np.float32)
        return out

    def empty(self) -> Arrays:
        out = {
            "keys": np.zeros(0, dtype=str),
            "pred": np.zeros(0, np.int64),
            "top5": np.zeros((0, 5), np.int64),
            "probs": np.zeros((0, 0), np.float16),
        }
        if self.labelled:
            out["correct1"], out["correct5"] = np.zeros(0, bool), np.zeros(0, bool)
        if self.keep_scores:
            out["scores"] = np.zeros((0, 0), np.float32)
        return out

    def evaluate(self, arrays: Arrays, keys: Sequence[str]) -> dict[str, Any]:
        if not self.labelled:
            return {}
        n = self.count(arrays)
        if not n:
            return {"top1": float("nan"), "top5": float("nan")}
        return {"top1": float(arrays["correct1"].mean()), "top5": float(arrays["correct5"].mean())}

    def _label_free(self, metric: str, arrays: Arrays, reference: Arrays) -> np.ndarray:
        """Per-image values of a label-free metric (0/1 agreement or a distance), on the images both hold."""
        t, r = _align(arrays, reference)
        pred_t, pred_r = arrays["pred"][t], reference["pred"][r]
        if metric == "agreement_top1":
            return ((pred_t == pred_r) & (pred_r >= 0)).astype(np.float64)
        if metric == "agreement_top5":
            return ((arrays["top5"][t] == pred_r[:, None]).any(axis=1) & (pred_r >= 0)).astype(np.float64)
        p, q = reference["probs"][r], arrays["probs"][t]
        if p.shape[1:] != q.shape[1:]:
            raise DataError(f"the target outputs {q.shape[-1]} classes and the reference {p.shape[-1]}")
        return l1_distance(q, p) if metric == "mean_l1" else kl_divergence(p, q)

    def agreement(self, arrays: Arrays, reference: Arrays) -> dict[str, float]:
        """Agreement (top-1, top-5) and distances (mean L1, mean KL) with the reference target, per image
        averaged; nan when the two share no image."""
        out = {}
        for m in ("agreement_top1", "agreement_top5", "mean_l1", "mean_kl"):
            v = self._label_free(m, arrays, reference)
            out[m] = float(v.mean()) if v.size else float("nan")
        return out

    def paired(
        self, metric: str, arrays: Arrays, reference: Arrays, keys: Sequence[str], **options: Any
    ) -> PairedSample:
        self.check_metric(metric)
        spec = self.spec(metric)
        if not spec.labelled:
            v = self._label_free(metric, arrays, reference)
            mean = float(v.mean()) if v.size else float("nan")
            binary = metric.startswith("agreement")
            return PairedSample(
                metric, mean, float(spec.reference_value), len(v), values=v, binary=binary, unit=spec.unit
            )
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
    metric_specs = (
        MetricSpec("mAP", about="mean average precision against the ground truth"),
        MetricSpec(
            "pseudo_map",
            labelled=False,
            about="the target's mAP (VOC all-point, IoU 0.5) against the reference's own detections scoring at "
            "least the gate's score_threshold (default 0.5), taken as ground truth",
        ),
    )
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

    def __init__(self, meta: dict[str, Any], labels: dict[str, Any], anchors: Any = None, labelled: bool = True):
        self.meta, self.labels, self.anchors_cfg, self.labelled = meta, labels, anchors, labelled
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
        if not self.labelled:
            return {}
        if not self.count(arrays):
            return {"mAP": float("nan")}
        return self.metric_on(self.detections(arrays), self.ground_truth(keys))

    def pseudo_labels(self, reference: Arrays, score_threshold: float) -> list[dict[str, Any]]:
        """The reference's detections scoring at least ``score_threshold``, per image, as ground truth."""
        out = []
        for d in self.detections(reference):
            keep = d.scores >= score_threshold
            n = int(keep.sum())
            out.append({"boxes": d.boxes[keep], "classes": d.classes[keep], "difficult": np.zeros(n, bool)})
        return out

    def _pseudo_map(self, dets: Sequence[Any], labels: Sequence[dict[str, Any]], idx: np.ndarray | None) -> float:
        classes = self.meta.get("classes") or [str(c) for c in range(len(self.meta.get("category_ids", ())))]
        metric = VocMetric(classes, use_07_metric=False)
        pick = range(len(dets)) if idx is None else idx
        metric.update([dets[i] for i in pick], [labels[i] for i in pick])
        return metric.result()["mAP_allpoint"]

    def paired(
        self, metric: str, arrays: Arrays, reference: Arrays, keys: Sequence[str], **options: Any
    ) -> PairedSample:
        self.check_metric(metric)
        if list(arrays["keys"]) != list(reference["keys"]):
            raise DataError("evaluated images differ from the reference's; cannot pair them")
        if metric == "pseudo_map":
            threshold = options.get("score_threshold")
            pseudo = self.pseudo_labels(reference, 0.5 if threshold is None else float(threshold))
            pdets, pref = self.detections(arrays), self.detections(reference)

            def pseudo_resample(idx: np.ndarray | None) -> tuple[float, float]:
                return self._pseudo_map(pdets, pseudo, idx), self._pseudo_map(pref, pseudo, idx)

            tv, rv = pseudo_resample(None)
            return PairedSample(metric, tv, rv, len(pdets), resample=pseudo_resample)
        labels = self.ground_truth(keys)
        dets, ref_dets = self.detections(arrays), self.detections(reference)
        if self.meta.get("metric") == "coco":
            # COCO AP by our own matcher (equal to pycocotools): the annotations are read once, and an image drawn
            # twice in a resample is two images with their own objects (pycocotools would merge them by id).
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


_METRICS: dict[str, tuple[MetricSpec, ...]] = {}


def register_task(name: str, factory: Callable[..., Task], metrics: tuple[MetricSpec, ...] = ()) -> None:
    """Register how a task is made for a dataset: ``factory(dataset, loaded, anchors_file) -> Task``, and the
    metrics its gates may name (the one place they are declared)."""
    _TASKS[name] = factory
    _METRICS[name] = tuple(metrics)


def task_metrics(name: str, labelled: bool = True) -> tuple[str, ...]:
    """The metrics a gate may name for a task (to check a plan before any work); without labels only the
    label-free ones."""
    return tuple(m.name for m in _METRICS.get(name, ()) if labelled or not m.labelled)


def _number_range(spec: MetricSpec) -> str:
    return f"[{spec.low:g}, {spec.high:g}]" if math.isfinite(spec.high) else f">= {spec.low:g}"


def check_gate(gate: Gate, task: str, labelled: bool = True, where: str = "gate") -> Gate:
    """A gate checked against the metrics its task declares, before any work: the metric exists for the task
    (its name's case corrected: ``map`` -> ``mAP``), the data can give it (a labelled metric on data without
    labels is refused), the rule fits the metric's direction (``max`` only on a metric that must be low,
    ``min`` / ``relative`` / ``max_drop_points`` only on one that must be high) and its threshold lies in the
    metric's range.

    Returns:
        The gate, its metric name canonical.

    Raises:
        ConfigError: One line naming ``where`` (the gate) and what to change.
    """
    specs = _METRICS.get(task, ())
    spec = next((m for m in specs if m.name.lower() == str(gate.metric).lower()), None)
    if spec is None:
        other = [t for t, ms in _METRICS.items() if any(m.name.lower() == str(gate.metric).lower() for m in ms)]
        hint = f" ({gate.metric} is a {other[0]} metric)" if other else ""
        raise ConfigError(
            f"{where}: metric '{gate.metric}' is not measured for a {task} model{hint}; choose one of: "
            f"{', '.join(m.name for m in specs)}"
        )
    if spec.labelled and not labelled:
        free = ", ".join(m.name for m in specs if not m.labelled)
        raise ConfigError(
            f"{where}: metric '{spec.name}' needs labels and the evaluation data has none (images:); gate a "
            f"label-free metric ({free}) or evaluate on labelled data"
        )
    if gate.score_threshold is not None and spec.name != "pseudo_map":
        raise ConfigError(f"{where}: score_threshold applies only to pseudo_map, not to {spec.name}")
    if spec.higher_is_better and gate.maximum is not None:
        raise ConfigError(f"{where}: {spec.name} must be high, so it takes min, relative or max_drop_points, not max")
    if not spec.higher_is_better and gate.maximum is None:
        raise ConfigError(
            f"{where}: {spec.name} is a distance (lower is better, the reference's own is 0): gate it with "
            f"max, e.g. {{metric: {spec.name}, max: 0.3}}"
        )
    bound = gate.minimum if gate.minimum is not None else gate.maximum
    if bound is not None and not spec.low <= bound <= spec.high:
        raise ConfigError(f"{where}: {spec.name} lies in {_number_range(spec)}; got {bound:g}")
    if gate.relative is not None and spec.reference_value is not None and gate.relative > spec.reference_value:
        raise ConfigError(
            f"{where}: relative must be at most 1 for {spec.name} (the reference's own is {spec.reference_value:g}, "
            f"and no target exceeds it); got {gate.relative:g}"
        )
    return dataclasses.replace(gate, metric=spec.name)


def make_task(dataset: Any, loaded: Any = None, anchors_file: str | None = None, **kwargs: Any) -> Task:
    """The task of a dataset (its loader declares it), bound to the dataset and, when given, the model (without
    one it can evaluate stored per-image arrays but not score raw outputs)."""
    if dataset.task not in _TASKS:
        raise ConfigError(f"no task '{dataset.task}'; known: {', '.join(_TASKS)}")
    return _TASKS[dataset.task](dataset, loaded, anchors_file, **kwargs)


def _classification(dataset: Any, loaded: Any, anchors_file: str | None, **kwargs: Any) -> Task:
    if loaded is not None:
        check_class_outputs(dataset, loaded)
    return ClassificationTask(labelled=dataset.labelled, **kwargs)


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
    return DetectionTask(dataset.meta, {s.key: s.label for s in dataset.samples}, anchors, dataset.labelled)


register_task("classification", _classification, ClassificationTask.metric_specs)
register_task("detection", _detection, DetectionTask.metric_specs)
