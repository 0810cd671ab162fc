"""Detection datasets: PASCAL VOC (VOCdevkit layout) and COCO 2017 (images + instances JSON).

Each sample's label is a dict of numpy arrays in the image's pixel coordinates: ``boxes`` (N, 4) as
x1, y1, x2, y2, ``classes`` (N,) as contiguous indices 0..C-1, ``difficult`` (N,) bools (VOC) or
``iscrowd`` (COCO), plus ``image_id``, ``width``, ``height``.
"""

from __future__ import annotations

import json
import math
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from quantship.data.datasets import FileRead, ImageDataset, Sample, register_dataset
from quantship.errors import DataError
from quantship.fileio import read_text

VOC_CLASSES = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)


@dataclass
class Detections:
    """Detections of one image in its pixel coordinates: boxes (M, 4) x1y1x2y2, scores (M,), classes (M,)."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray

    @classmethod
    def empty(cls) -> "Detections":
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))


def _reader(path: Path) -> FileRead:
    return FileRead(path)


def _find_voc_root(path: Path) -> Path:
    for cand in (path, path / "VOC2007", path / "VOCdevkit" / "VOC2007"):
        if (cand / "Annotations").is_dir() and (cand / "ImageSets" / "Main").is_dir():
            return cand
    raise DataError(f"{path}: not a VOCdevkit folder (expected Annotations/ and ImageSets/Main/ in it or in VOC2007/)")


def _inside(folder: Path, name: Any, where: Path) -> Path:
    """``folder / name`` when it stays inside ``folder`` once normalised (``../../etc/hostname`` does not); the
    folder itself may be a symlink (``val2017 -> /mnt/...``)."""
    if not isinstance(name, str) or not name:
        raise DataError(f"{where}: file_name {name!r} is not a file name")
    joined = os.path.normpath(os.path.join(folder, name))
    base = os.path.normpath(folder)
    if os.path.isabs(name) or os.path.commonpath([joined, base]) != base or joined == base:
        raise DataError(f"{where}: file_name '{name}' points outside {folder}; image paths must stay inside it")
    return Path(joined)


def parse_voc_xml(path: Path, classes: tuple[str, ...] = VOC_CLASSES) -> dict[str, Any]:
    """One VOC annotation file -> label dict. Raises DataError naming the file and element."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise DataError(f"{path}: malformed XML ({exc})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read annotation ({exc})") from None

    def text(node, tag, where):
        el = node.find(tag)
        if el is None or el.text is None:
            raise DataError(f"{path}: <{where}> has no <{tag}>")
        return el.text.strip()

    try:
        width, height = (
            int(float(text(root, "size/width", "annotation"))),
            int(float(text(root, "size/height", "annotation"))),
        )
    except ValueError:
        raise DataError(f"{path}: <size> holds non-numeric width/height") from None
    boxes, labels, difficult = [], [], []
    for k, obj in enumerate(root.findall("object")):
        name = text(obj, "name", f"object {k}")
        if name not in classes:
            raise DataError(f"{path}: object {k} has unknown class '{name}' (known: {', '.join(classes)})")
        try:
            box = [float(text(obj, f"bndbox/{c}", f"object {k}")) for c in ("xmin", "ymin", "xmax", "ymax")]
        except ValueError:
            raise DataError(f"{path}: object {k} ({name}) has a non-numeric <bndbox>") from None
        x1, y1, x2, y2 = box
        if (
            not (x1 <= x2 and y1 <= y2)
            or x2 < 1
            or y2 < 1
            or x1 > width
            or y1 > height
            or x2 > width + 1
            or y2 > height + 1
        ):
            raise DataError(f"{path}: object {k} ({name}) box {box} is outside the {width}x{height} image or inverted")
        diff = obj.find("difficult")
        boxes.append(box)
        labels.append(classes.index(name))
        difficult.append(diff is not None and (diff.text or "0").strip() == "1")
    return {
        "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
        "classes": np.asarray(labels, np.int64),
        "difficult": np.asarray(difficult, bool),
        "width": width,
        "height": height,
    }


def _missing(listing: Path, missing: list[str], folder: Path, present: int, allow: bool) -> None:
    if missing and not allow:
        raise DataError(
            f"{listing}: {len(missing)} listed image(s) missing from {folder} (e.g. {', '.join(missing[:3])}); copy "
            f"them there, or pass --allow-missing-images to evaluate the {present} present"
        )


@register_dataset("voc2007", task="detection")
def load_voc(
    path: Path, labels: str | None = None, split: str = "test", allow_missing_images: bool = False
) -> ImageDataset:
    """VOCdevkit/VOC2007 with ``ImageSets/Main/<split>.txt`` (``--labels`` may name another list file)."""
    root = _find_voc_root(Path(path))
    listing = Path(labels) if labels else root / "ImageSets" / "Main" / f"{split}.txt"
    if not listing.is_file():
        raise DataError(f"image list not found: {listing}")
    ids = [ln.split()[0] for ln in read_text(listing).splitlines() if ln.strip()]
    if not ids:
        raise DataError(f"{listing}: lists no images")
    bad = next((i for i in ids if Path(i).name != i or i in (".", "..")), None)
    if bad is not None:
        raise DataError(f"{listing}: '{bad}' is not an image id (a file name without folder or extension)")
    missing = [i for i in ids if not (root / "JPEGImages" / f"{i}.jpg").is_file()]
    _missing(listing, [f"{i}.jpg" for i in missing], root / "JPEGImages", len(ids) - len(missing), allow_missing_images)
    ids = [i for i in ids if i not in set(missing)]
    samples = []
    for image_id in ids:
        xml = root / "Annotations" / f"{image_id}.xml"
        if not xml.is_file():
            raise DataError(f"annotation missing for listed image {image_id}: {xml}")
        label = parse_voc_xml(xml)
        label["image_id"] = image_id
        img = root / "JPEGImages" / f"{image_id}.jpg"
        samples.append(Sample(str(img.resolve()), label, _reader(img)))
    meta = {"classes": list(VOC_CLASSES), "metric": "voc", "missing_images": len(missing)}
    return ImageDataset("voc2007", str(root), samples, task="detection", meta=meta)


def _coco_id(value: Any, where: str) -> int:
    """A COCO image id: a whole number in 0 .. 2**63-1 (a float such as 1e30 is not an id; digits in a text are)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise DataError(f"{where}: expected a whole number id >= 0, got {value!r}")
    return value


@register_dataset("coco", task="detection")
def load_coco(
    path: Path, labels: str | None = None, split: str = "val2017", allow_missing_images: bool = False
) -> ImageDataset:
    """COCO: ``<path>/<split>/*.jpg`` and ``<path>/annotations/instances_<split>.json`` (or ``--labels``)."""
    path = Path(path)
    ann = Path(labels) if labels else path / "annotations" / f"instances_{split}.json"
    images_dir = path / split
    if not ann.is_file():
        raise DataError(f"COCO annotations not found: {ann}")
    if not images_dir.is_dir():
        raise DataError(f"COCO image folder not found: {images_dir}")
    try:
        doc = json.loads(read_text(ann))
    except json.JSONDecodeError as exc:
        raise DataError(f"{ann}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    if not isinstance(doc, dict):
        raise DataError(f"{ann}: the top level must be an object with images, annotations and categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(doc.get(key), list):
            raise DataError(f"{ann}: '{key}' must be a list")
    if not doc["annotations"]:
        raise DataError(f"{ann}: 'annotations' is empty: there is no ground truth to score detections against")
    ids: dict[int, int] = {}
    for k, img in enumerate(doc["images"]):
        image_id = _coco_id(img.get("id") if isinstance(img, dict) else None, f"{ann}: images[{k}].id")
        if image_id in ids:
            raise DataError(f"{ann}: images[{ids[image_id]}] and images[{k}] have the same id {image_id}")
        ids[image_id] = k
    try:
        cats = sorted(doc["categories"], key=lambda c: c["id"])
        cat_ids = [int(c["id"]) for c in cats]  # the 91-id space, 80 used
        to_contiguous = {cid: i for i, cid in enumerate(cat_ids)}
        per_image: dict[int, list] = {}
        for k, a in enumerate(doc["annotations"]):
            if a["category_id"] not in to_contiguous:
                raise DataError(f"{ann}: annotations[{k}] has unknown category_id {a['category_id']}")
            image_id = _coco_id(a["image_id"], f"{ann}: annotations[{k}].image_id")
            if image_id not in ids:  # a box of no listed image: the ground truth and the images disagree
                raise DataError(f"{ann}: annotations[{k}] is on image_id {image_id}, which no entry of 'images' has")
            per_image.setdefault(image_id, []).append(a)
        samples = []
        missing = []
        for img in doc["images"]:
            file = _inside(images_dir, img["file_name"], ann)
            if not file.is_file():
                missing.append(img["file_name"])
                continue
            w, h = int(img["width"]), int(img["height"])
            anns = per_image.get(int(img["id"]), [])
            boxes = []
            for a in anns:
                x, y, bw, bh = (float(v) for v in a["bbox"])
                if not all(math.isfinite(v) for v in (x, y, bw, bh)):
                    raise DataError(
                        f"{ann}: annotation {a.get('id')} of image {img['id']} box {a['bbox']} holds a value that is "
                        "not a finite number"
                    )
                if bw < 0 or bh < 0 or x > w or y > h or x + bw > w + 1 or y + bh > h + 1:
                    raise DataError(
                        f"{ann}: annotation {a.get('id')} of image {img['id']} box {a['bbox']} is outside the "
                        f"{w}x{h} image"
                    )
                boxes.append([x, y, x + bw, y + bh])
            label = {
                "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
                "classes": np.asarray([to_contiguous[a["category_id"]] for a in anns], np.int64),
                "iscrowd": np.asarray([bool(a.get("iscrowd", 0)) for a in anns], bool),
                "difficult": np.asarray([bool(a.get("iscrowd", 0)) for a in anns], bool),
                "image_id": int(img["id"]),
                "width": w,
                "height": h,
            }
            samples.append(Sample(str(file.resolve()), label, _reader(file)))
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{ann}: unexpected structure ({type(exc).__name__}: {exc})") from None
    _missing(ann, missing, images_dir, len(samples), allow_missing_images)
    if not samples:
        raise DataError(f"{ann}: lists no images")
    meta = {
        "classes": [c["name"] for c in cats],
        "category_ids": cat_ids,
        "metric": "coco",
        "annotation_file": str(ann),
        "missing_images": len(missing),
    }
    return ImageDataset("coco", str(path), samples, task="detection", meta=meta)
