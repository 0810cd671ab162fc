"""SSD detectors (Liu et al., 2016) and the numpy post-processing every runtime shares.

The exported graph ends at the raw heads: one tensor (N, anchors, classes + 4) holding the softmax class
scores (background first) and the box offsets. Anchors, box decoding and non-maximum suppression live here,
outside the graph, so Keras, TFLite, ONNX Runtime and TensorRT are compared on identical post-processing.

Layer names follow the widely used Keras SSD implementation (``conv1_1`` ... ``conv4_3``, ``conv4_3_norm``,
``fc6``, ``fc7``, ``conv6_1`` ... ``conv9_2``, ``<source>_mbox_conf`` / ``<source>_mbox_loc``), so its
published ``.h5`` weight files load by name.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from quantship.data.detection import Detections
from quantship.errors import ConfigError, ModelLoadError
from quantship.fileio import write_json_atomic
from quantship.lazy import lazy_import

VARIANCES = (0.1, 0.1, 0.2, 0.2)


@dataclass(frozen=True)
class AnchorConfig:
    """SSD anchors: per source layer its feature-map size, scale and aspect ratios (+ one extra box at
    sqrt(s_k * s_k+1) for aspect ratio 1), centres at (i + offset) * step."""

    image_size: tuple[int, int]
    feature_sizes: tuple[tuple[int, int], ...]
    scales: tuple[float, ...]  # len(feature_sizes) + 1
    aspect_ratios: tuple[tuple[float, ...], ...]
    steps: tuple[float, ...] | None = None
    offset: float = 0.5
    variances: tuple[float, float, float, float] = VARIANCES
    num_classes: int = 21  # with background
    class_names: tuple[str, ...] = ()

    def boxes_per_cell(self, k: int) -> int:
        ars = self.aspect_ratios[k]
        return len(ars) + (1 if 1.0 in ars else 0)

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> "AnchorConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
            return cls(
                image_size=tuple(d["image_size"]),
                feature_sizes=tuple(tuple(f) for f in d["feature_sizes"]),
                scales=tuple(d["scales"]),
                aspect_ratios=tuple(tuple(a) for a in d["aspect_ratios"]),
                steps=tuple(d["steps"]) if d.get("steps") else None,
                offset=d.get("offset", 0.5),
                variances=tuple(d.get("variances", VARIANCES)),
                num_classes=int(d["num_classes"]),
                class_names=tuple(d.get("class_names", ())),
            )
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path}: not a readable anchor configuration ({exc})") from None


def make_anchors(cfg: AnchorConfig) -> np.ndarray:
    """(A, 4) anchors as normalised cx, cy, w, h, in the order of the heads' reshaped outputs (row, column, box)."""
    out = []
    ih, iw = cfg.image_size
    for k, (fh, fw) in enumerate(cfg.feature_sizes):
        s, s_next = cfg.scales[k], cfg.scales[k + 1]
        wh = []
        for ar in cfg.aspect_ratios[k]:
            wh.append((s * np.sqrt(ar), s / np.sqrt(ar)))
            if ar == 1.0:
                extra = np.sqrt(s * s_next)
                wh.append((extra, extra))
        step_y = (cfg.steps[k] / ih) if cfg.steps else 1.0 / fh
        step_x = (cfg.steps[k] / iw) if cfg.steps else 1.0 / fw
        cy, cx = np.meshgrid(
            (np.arange(fh) + cfg.offset) * step_y, (np.arange(fw) + cfg.offset) * step_x, indexing="ij"
        )
        cells = np.stack([cx.ravel(), cy.ravel()], axis=1)
        for c in cells:
            for w, h in wh:
                out.append((c[0], c[1], w, h))
    return np.asarray(out, np.float32)


def decode_boxes(loc: np.ndarray, anchors: np.ndarray, variances: Sequence[float] = VARIANCES) -> np.ndarray:
    """Offsets (A, 4) -> normalised x1, y1, x2, y2."""
    cx = anchors[:, 0] + loc[:, 0] * variances[0] * anchors[:, 2]
    cy = anchors[:, 1] + loc[:, 1] * variances[1] * anchors[:, 3]
    w = anchors[:, 2] * np.exp(loc[:, 2] * variances[2])
    h = anchors[:, 3] * np.exp(loc[:, 3] * variances[3])
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)


def encode_boxes(boxes: np.ndarray, anchors: np.ndarray, variances: Sequence[float] = VARIANCES) -> np.ndarray:
    """Normalised x1, y1, x2, y2 (A, 4) -> offsets relative to ``anchors`` (the inverse of decode)."""
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    cx = boxes[:, 0] + w / 2
    cy = boxes[:, 1] + h / 2
    return np.stack(
        [
            (cx - anchors[:, 0]) / (anchors[:, 2] * variances[0]),
            (cy - anchors[:, 1]) / (anchors[:, 3] * variances[1]),
            np.log(np.maximum(w, 1e-6) / anchors[:, 2]) / variances[2],
            np.log(np.maximum(h, 1e-6) / anchors[:, 3]) / variances[3],
        ],
        axis=1,
    ).astype(np.float32)


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a`` (N, 4) with every box in ``b`` (M, 4), continuous coordinates."""
    tl = np.maximum(a[:, None, :2], b[None, :, :2])
    br = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(br - tl, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression; indices kept, by descending score."""
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        if order.size == 1:
            break
        ious = iou_matrix(boxes[i : i + 1], boxes[order[1:]])[0]
        order = order[1:][ious <= iou_threshold]
    return np.asarray(keep, np.int64)


def postprocess(
    output: np.ndarray,
    anchors: np.ndarray,
    cfg: AnchorConfig,
    image_size: tuple[int, int],
    score_threshold: float = 0.01,
    iou_threshold: float = 0.45,
    top_k: int = 200,
):
    """One image's raw output (A, classes + 4) -> Detections in that image's pixels (width, height)."""

    scores, loc = output[:, : cfg.num_classes], output[:, cfg.num_classes :]
    boxes = decode_boxes(loc, anchors, cfg.variances)
    w, h = image_size
    boxes = np.clip(boxes, 0.0, 1.0) * np.asarray([w, h, w, h], np.float32)
    all_boxes, all_scores, all_classes = [], [], []
    for c in range(1, cfg.num_classes):  # 0 is background
        m = scores[:, c] > score_threshold
        if not m.any():
            continue
        b, s = boxes[m], scores[m, c]
        keep = nms(b, s, iou_threshold)
        all_boxes.append(b[keep])
        all_scores.append(s[keep])
        all_classes.append(np.full(len(keep), c - 1, np.int64))  # contiguous dataset class, background removed
    if not all_boxes:
        return Detections.empty()
    boxes_a, scores_a, classes_a = np.concatenate(all_boxes), np.concatenate(all_scores), np.concatenate(all_classes)
    order = np.argsort(-scores_a, kind="stable")[:top_k]
    return Detections(boxes_a[order], scores_a[order], classes_a[order])


def match_anchors(
    gt_boxes: np.ndarray, gt_classes: np.ndarray, anchors: np.ndarray, variances=VARIANCES, threshold: float = 0.5
):
    """Training targets: class per anchor (0 background, c + 1 for dataset class c) and encoded offsets.

    Each ground-truth box takes its best anchor, then every anchor with IoU >= threshold takes its best box.
    """
    n = len(anchors)
    labels = np.zeros(n, np.int64)
    loc = np.zeros((n, 4), np.float32)
    if len(gt_boxes) == 0:
        return labels, loc
    corners = np.concatenate([anchors[:, :2] - anchors[:, 2:] / 2, anchors[:, :2] + anchors[:, 2:] / 2], axis=1)
    ious = iou_matrix(corners, gt_boxes)
    best_gt = ious.argmax(axis=1)
    best_iou = ious.max(axis=1)
    best_gt[ious.argmax(axis=0)] = np.arange(len(gt_boxes))
    best_iou[ious.argmax(axis=0)] = 1.0
    pos = best_iou >= threshold
    labels[pos] = gt_classes[best_gt[pos]] + 1
    loc[pos] = encode_boxes(gt_boxes[best_gt[pos]], anchors[pos], variances)
    return labels, loc


# ---------------------------------------------------------------------------------------------- models


@functools.lru_cache(maxsize=1)
def l2norm_layer():
    """The L2Normalization layer class (defined, and registered for .keras loading, on first use)."""
    keras = lazy_import("keras")

    @keras.saving.register_keras_serializable(package="quantship")
    class L2Normalization(keras.layers.Layer):
        """Channel-wise L2 normalisation with a learned per-channel scale ``gamma`` (SSD's conv4_3_norm)."""

        def __init__(self, gamma_init: float = 20.0, **kwargs: Any):
            super().__init__(**kwargs)
            self.gamma_init = gamma_init

        def build(self, input_shape):
            self.gamma = self.add_weight(
                name="gamma", shape=(input_shape[-1],), initializer=keras.initializers.Constant(self.gamma_init)
            )

        def call(self, x):
            ops = keras.ops
            return x * ops.rsqrt(ops.maximum(ops.sum(ops.square(x), axis=-1, keepdims=True), 1e-12)) * self.gamma

        def get_config(self):
            return {**super().get_config(), "gamma_init": self.gamma_init}

    return L2Normalization


def ssd_head(sources: Sequence[tuple[str, Any]], cfg: AnchorConfig, separable: bool = False):
    """Class and box heads on each source, reshaped and concatenated to (N, anchors, classes + 4)."""
    keras = lazy_import("keras")
    L = keras.layers
    confs, locs = [], []
    for k, (name, x) in enumerate(sources):
        n = cfg.boxes_per_cell(k)
        if separable:
            c = L.SeparableConv2D(n * cfg.num_classes, 3, padding="same", name=f"{name}_mbox_conf")(x)
            b = L.SeparableConv2D(n * 4, 3, padding="same", name=f"{name}_mbox_loc")(x)
        else:
            c = L.Conv2D(n * cfg.num_classes, 3, padding="same", name=f"{name}_mbox_conf")(x)
            b = L.Conv2D(n * 4, 3, padding="same", name=f"{name}_mbox_loc")(x)
        confs.append(L.Reshape((-1, cfg.num_classes), name=f"{name}_mbox_conf_reshape")(c))
        locs.append(L.Reshape((-1, 4), name=f"{name}_mbox_loc_reshape")(b))
    conf = L.Concatenate(axis=1, name="mbox_conf")(confs)
    conf = L.Activation("softmax", name="mbox_conf_softmax")(conf)
    loc = L.Concatenate(axis=1, name="mbox_loc")(locs)
    return L.Concatenate(axis=2, name="predictions")([conf, loc])


def _vgg16_base(x):
    keras = lazy_import("keras")
    L = keras.layers
    for block, (n, f) in enumerate(((2, 64), (2, 128), (3, 256), (3, 512), (3, 512)), start=1):
        for i in range(1, n + 1):
            x = L.Conv2D(f, 3, padding="same", activation="relu", name=f"conv{block}_{i}")(x)
        if block == 4:
            conv4_3 = x
        if block < 5:
            x = L.MaxPooling2D(2, strides=2, padding="same", name=f"pool{block}")(x)
        else:
            x = L.MaxPooling2D(3, strides=1, padding="same", name="pool5")(x)
    x = L.Conv2D(1024, 3, dilation_rate=6, padding="same", activation="relu", name="fc6")(x)
    fc7 = L.Conv2D(1024, 1, padding="same", activation="relu", name="fc7")(x)
    return conv4_3, fc7


def _extra(x, name_1, f1, name_2, f2, stride, pad):
    keras = lazy_import("keras")
    L = keras.layers
    x = L.Conv2D(f1, 1, padding="same", activation="relu", name=name_1)(x)
    if pad:
        x = L.ZeroPadding2D(((1, 1), (1, 1)), name=f"{name_2.split('_')[0]}_padding")(x)
    return L.Conv2D(f2, 3, strides=stride, padding="valid", activation="relu", name=name_2)(x)


def ssd_anchor_config(size: int, num_classes: int = 21, class_names: Sequence[str] = ()) -> AnchorConfig:
    """The original SSD300 / SSD512 anchor layout (scales for VOC)."""
    if size == 300:
        return AnchorConfig(
            (300, 300),
            ((38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)),
            (0.1, 0.2, 0.37, 0.54, 0.71, 0.88, 1.05),
            (
                (1.0, 2.0, 0.5),
                (1.0, 2.0, 0.5, 3.0, 1 / 3),
                (1.0, 2.0, 0.5, 3.0, 1 / 3),
                (1.0, 2.0, 0.5, 3.0, 1 / 3),
                (1.0, 2.0, 0.5),
                (1.0, 2.0, 0.5),
            ),
            steps=(8, 16, 32, 64, 100, 300),
            num_classes=num_classes,
            class_names=tuple(class_names),
        )
    if size == 512:
        return AnchorConfig(
            (512, 512),
            ((64, 64), (32, 32), (16, 16), (8, 8), (4, 4), (2, 2), (1, 1)),
            (0.07, 0.15, 0.3, 0.45, 0.6, 0.75, 0.9, 1.05),
            (
                (1.0, 2.0, 0.5),
                (1.0, 2.0, 0.5, 3.0, 1 / 3),
                (1.0, 2.0, 0.5, 3.0, 1 / 3),
                (1.0, 2.0, 0.5, 3.0, 1 / 3),
                (1.0, 2.0, 0.5, 3.0, 1 / 3),
                (1.0, 2.0, 0.5),
                (1.0, 2.0, 0.5),
            ),
            steps=(8, 16, 32, 64, 128, 256, 512),
            num_classes=num_classes,
            class_names=tuple(class_names),
        )
    raise ConfigError(f"SSD input size must be 300 or 512, got {size}")


def build_ssd_vgg16(size: int = 300, num_classes: int = 21, input_shape=None, **_: Any):
    """SSD300 or SSD512 with a VGG16 backbone and L2-normalised conv4_3, random weights."""
    keras = lazy_import("keras")
    L = keras.layers
    cfg = ssd_anchor_config(size, num_classes)
    inputs = keras.Input((size, size, 3), name="input")
    conv4_3, fc7 = _vgg16_base(inputs)
    norm = l2norm_layer()(20.0, name="conv4_3_norm")(conv4_3)
    conv6_2 = _extra(fc7, "conv6_1", 256, "conv6_2", 512, 2, True)
    conv7_2 = _extra(conv6_2, "conv7_1", 128, "conv7_2", 256, 2, True)
    if size == 300:
        conv8_2 = _extra(conv7_2, "conv8_1", 128, "conv8_2", 256, 1, False)
        conv9_2 = _extra(conv8_2, "conv9_1", 128, "conv9_2", 256, 1, False)
        sources = [
            ("conv4_3_norm", norm),
            ("fc7", fc7),
            ("conv6_2", conv6_2),
            ("conv7_2", conv7_2),
            ("conv8_2", conv8_2),
            ("conv9_2", conv9_2),
        ]
    else:
        conv8_2 = _extra(conv7_2, "conv8_1", 128, "conv8_2", 256, 2, True)
        conv9_2 = _extra(conv8_2, "conv9_1", 128, "conv9_2", 256, 2, True)
        x = L.Conv2D(128, 1, padding="same", activation="relu", name="conv10_1")(conv9_2)
        x = L.ZeroPadding2D(((1, 1), (1, 1)), name="conv10_padding")(x)
        conv10_2 = L.Conv2D(256, 4, strides=1, padding="valid", activation="relu", name="conv10_2")(x)
        sources = [
            ("conv4_3_norm", norm),
            ("fc7", fc7),
            ("conv6_2", conv6_2),
            ("conv7_2", conv7_2),
            ("conv8_2", conv8_2),
            ("conv9_2", conv9_2),
            ("conv10_2", conv10_2),
        ]
    model = keras.Model(inputs, ssd_head(sources, cfg), name=f"ssd{size}")
    _check_anchor_count(model, cfg)
    return model


def build_ssdlite_mobilenet_v2(num_classes: int = 21, input_shape=None, size: int = 320, **_: Any):
    """SSDLite: MobileNetV2 features (block_13_expand_relu, out_relu) + depthwise-separable extra layers
    and heads, random weights."""
    keras = lazy_import("keras")
    L = keras.layers
    backbone = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(size, size, 3))
    f1 = backbone.get_layer("block_13_expand_relu").output
    f2 = backbone.get_layer("out_relu").output
    sources = [("block_13_expand_relu", f1), ("out_relu", f2)]
    x = f2
    for k, ch in enumerate((512, 256, 256, 128), start=1):
        x = L.Conv2D(ch // 2, 1, activation="relu6", name=f"extra{k}_1x1")(x)
        x = L.DepthwiseConv2D(3, strides=2, padding="same", activation="relu6", name=f"extra{k}_dw")(x)
        x = L.Conv2D(ch, 1, activation="relu6", name=f"extra{k}_pw")(x)
        sources.append((f"extra{k}_pw", x))
    fm = [tuple(int(d) for d in s[1].shape[1:3]) for s in sources]
    cfg = AnchorConfig(
        (size, size),
        tuple(fm),
        (0.2, 0.35, 0.5, 0.65, 0.8, 0.95, 1.0),
        tuple((1.0, 2.0, 0.5) if k == 0 else (1.0, 2.0, 0.5, 3.0, 1 / 3) for k in range(len(fm))),
        num_classes=num_classes,
    )
    model = keras.Model(backbone.input, ssd_head(sources, cfg, separable=True), name="ssdlite_mobilenet_v2")
    model.anchor_config = cfg
    return model


def _check_anchor_count(model, cfg: AnchorConfig) -> None:
    n = int(model.outputs[0].shape[1])
    if n != len(make_anchors(cfg)):
        raise AssertionError(f"{model.name}: {n} predictions but {len(make_anchors(cfg))} anchors")


def ssdlite_anchor_config(num_classes: int = 21, size: int = 320) -> AnchorConfig:
    fm = [(20, 20), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1)]
    return AnchorConfig(
        (size, size),
        tuple(fm),
        (0.2, 0.35, 0.5, 0.65, 0.8, 0.95, 1.0),
        tuple((1.0, 2.0, 0.5) if k == 0 else (1.0, 2.0, 0.5, 3.0, 1 / 3) for k in range(len(fm))),
        num_classes=num_classes,
    )


def load_weights_by_name(model: Any, path: str | Path) -> dict[str, list[str]]:
    """Load a Keras-2 style ``.h5`` weight file by layer name (layers absent from the file keep their values).

    Returns:
        ``{"loaded": [...], "missing_in_file": [...]}``.

    Raises:
        ModelLoadError: Unreadable file, or a layer whose weight shapes do not match.
    """
    import h5py  # lazy: ~0.13 s to import, only for .h5 weight files

    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise ModelLoadError(f"{path}: not a readable HDF5 file ({exc})") from None
    with f:
        group = f["model_weights"] if "model_weights" in f and "layer_names" not in f.attrs else f
        names = [n.decode() if isinstance(n, bytes) else n for n in group.attrs.get("layer_names", [])]
        loaded, missing = [], []
        for layer in model.layers:
            if not layer.weights:
                continue
            if layer.name not in names:
                missing.append(layer.name)
                continue
            g = group[layer.name]
            wnames = [n.decode() if isinstance(n, bytes) else n for n in g.attrs.get("weight_names", [])]
            values = [np.asarray(g[w]) for w in wnames]
            expected = [tuple(w.shape) for w in layer.get_weights()]
            if [tuple(v.shape) for v in values] != expected:
                raise ModelLoadError(
                    f"{path}: layer '{layer.name}' has weights {[v.shape for v in values]}, the model expects "
                    f"{expected}"
                )
            layer.set_weights(values)
            loaded.append(layer.name)
    if not loaded:
        raise ModelLoadError(f"{path}: no layer of {model.name} found in the file by name")
    return {"loaded": loaded, "missing_in_file": missing}


def anchors_for(loaded: Any, dataset: Any, anchors_file: str | None = None) -> AnchorConfig:
    """The anchor configuration of a detection model (its registry default, or ``--anchors FILE`` for a model
    given as a file), checked against the dataset's classes and the model's output.

    Raises:
        ConfigError: No anchors for a model file, or anchors that do not fit the output or the classes.
    """
    n_classes = len(dataset.meta["classes"]) + 1
    if anchors_file:
        cfg = AnchorConfig.load(anchors_file)
    elif loaded.spec is not None and "anchors" in loaded.spec.extra:
        cfg = loaded.spec.extra["anchors"](n_classes)
    else:
        raise ConfigError(
            f"{loaded.name}: a detection model given as a file needs --anchors FILE (its anchor configuration as JSON)"
        )
    out_shape = tuple(loaded.model.outputs[0].shape[1:])
    if out_shape != (len(make_anchors(cfg)), cfg.num_classes + 4):
        raise ConfigError(
            f"{loaded.name}: output {out_shape} does not fit {len(make_anchors(cfg))} anchors x "
            f"({cfg.num_classes} classes + 4)"
        )
    if cfg.num_classes != n_classes:
        raise ConfigError(f"{loaded.name}: {cfg.num_classes - 1} object classes, the dataset has {n_classes - 1}")
    return cfg
