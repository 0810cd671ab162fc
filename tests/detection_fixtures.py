"""Generated detection data (VOC and COCO layouts) and a tiny SSD trained on it in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from quantship.data.detection import VOC_CLASSES

SIZE = 64
OBJECT_CLASSES = (7, 11)  # VOC 'cat' and 'dog': red squares and blue wide bars


def synthetic_scene(rng: np.random.Generator, w: int = 96, h: int = 80):
    """An RGB image with 1-2 objects; returns (image, boxes x1y1x2y2, classes)."""
    img = rng.integers(0, 60, (h, w, 3)).astype(np.uint8)
    boxes, classes = [], []
    for _ in range(rng.integers(1, 3)):
        cls = int(rng.integers(0, 2))
        if cls == 0:
            s = int(rng.integers(18, 34))
            bw, bh = s, s
        else:
            bw, bh = int(rng.integers(30, 50)), int(rng.integers(12, 20))
        x1, y1 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
        color = (220, 40, 40) if cls == 0 else (40, 60, 220)
        img[y1 : y1 + bh, x1 : x1 + bw] = color
        boxes.append([x1, y1, x1 + bw - 1, y1 + bh - 1])
        classes.append(OBJECT_CLASSES[cls])
    return img, np.asarray(boxes, np.float32), np.asarray(classes, np.int64)


def write_voc(root: Path, n: int, seed: int) -> Path:
    import cv2

    base = root / "VOCdevkit" / "VOC2007"
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (base / d).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ids = []
    for i in range(n):
        img, boxes, classes = synthetic_scene(rng)
        image_id = f"{i:06d}"
        ids.append(image_id)
        cv2.imwrite(
            str(base / "JPEGImages" / f"{image_id}.jpg"),
            cv2.cvtColor(img, cv2.COLOR_RGB2BGR),
            [cv2.IMWRITE_JPEG_QUALITY, 95],
        )
        objs = "".join(
            f"<object><name>{VOC_CLASSES[c]}</name><difficult>{int(k == 0 and i % 5 == 0)}</difficult>"
            f"<bndbox><xmin>{b[0] + 1:.0f}</xmin><ymin>{b[1] + 1:.0f}</ymin>"
            f"<xmax>{b[2] + 1:.0f}</xmax><ymax>{b[3] + 1:.0f}</ymax></bndbox></object>"
            for k, (b, c) in enumerate(zip(boxes, classes))
        )
        (base / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><filename>{image_id}.jpg</filename><size><width>{img.shape[1]}</width><height>{img.shape[0]}</height><depth>3</depth></size>{objs}</annotation>"
        )
    (base / "ImageSets" / "Main" / "test.txt").write_text("\n".join(ids) + "\n")
    return root / "VOCdevkit"


COCO_IDS = [i for i in range(1, 23) if i not in (12, 21)]  # 20 categories with gaps, like COCO's 91-id space


def write_coco(root: Path, n: int, seed: int) -> Path:
    import cv2

    (root / "val2017").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for i in range(n):
        img, boxes, classes = synthetic_scene(rng)
        name = f"{i:012d}.jpg"
        cv2.imwrite(str(root / "val2017" / name), cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
        images.append({"id": 1000 + i, "file_name": name, "width": img.shape[1], "height": img.shape[0]})
        for b, c in zip(boxes, classes):
            w, h = float(b[2] - b[0] + 1), float(b[3] - b[1] + 1)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": 1000 + i,
                    "category_id": COCO_IDS[c],
                    "bbox": [float(b[0]), float(b[1]), w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    cats = [{"id": cid, "name": VOC_CLASSES[k], "supercategory": "thing"} for k, cid in enumerate(COCO_IDS)]
    (root / "annotations" / "instances_val2017.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats})
    )
    return root


def tiny_anchor_config():
    from quantship.models.ssd import AnchorConfig

    return AnchorConfig(
        (SIZE, SIZE), ((8, 8), (4, 4)), (0.2, 0.45, 0.8), ((1.0, 2.0, 0.5, 3.0), (1.0, 2.0, 0.5, 3.0)), num_classes=21
    )


def build_tiny_detector():
    import keras

    from quantship.models.ssd import ssd_head

    cfg = tiny_anchor_config()
    inputs = keras.Input((SIZE, SIZE, 3), name="input")
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu", name="c1")(inputs)
    x = keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu", name="c2")(x)
    f1 = keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu", name="c3")(x)
    f2 = keras.layers.Conv2D(48, 3, strides=2, padding="same", activation="relu", name="c4")(f1)
    return keras.Model(inputs, ssd_head([("c3", f1), ("c4", f2)], cfg), name="tiny_ssd"), cfg


def train_tiny_detector(n: int = 400, epochs: int = 25, seed: int = 0):
    """Train on fresh scenes (not the evaluation files); returns (model, anchor config)."""
    import cv2
    import keras
    from keras import ops

    from quantship.models.ssd import make_anchors, match_anchors

    keras.utils.set_random_seed(seed)
    model, cfg = build_tiny_detector()
    anchors = make_anchors(cfg)
    rng = np.random.default_rng(seed + 100)
    xs, ys = [], []
    for _ in range(n):
        img, boxes, classes = synthetic_scene(rng)
        h, w = img.shape[:2]
        xs.append(cv2.resize(img, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 127.5 - 1)
        norm = (boxes + np.array([0, 0, 1, 1], np.float32)) / np.array([w, h, w, h], np.float32)
        labels, loc = match_anchors(norm, classes, anchors, threshold=0.45)
        ys.append(np.concatenate([labels[:, None].astype(np.float32), loc], axis=1))
    C = cfg.num_classes

    def loss(y_true, y_pred):
        labels = ops.cast(y_true[..., 0], "int32")
        pos = ops.cast(labels > 0, "float32")
        n_pos = ops.maximum(ops.sum(pos), 1.0)
        probs = ops.clip(y_pred[..., :C], 1e-7, 1.0)
        ce = -ops.log(ops.sum(ops.one_hot(labels, C) * probs, axis=-1))
        neg = 1.0 - pos
        neg_weight = 3.0 * n_pos / ops.maximum(ops.sum(neg), 1.0)
        diff = ops.abs(y_pred[..., C:] - y_true[..., 1:])
        smooth_l1 = ops.sum(ops.where(diff < 1.0, 0.5 * diff**2, diff - 0.5), axis=-1)
        return (ops.sum(ce * pos) + ops.sum(ce * neg) * neg_weight + ops.sum(smooth_l1 * pos)) / n_pos

    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss=loss)
    model.fit(np.stack(xs), np.stack(ys), epochs=epochs, batch_size=32, verbose=0)
    return model, cfg
