"""ImageNet validation data in the on-disk formats people actually have.

* a folder of JPEGs + a ground-truth file: the devkit's ``ILSVRC2012_validation_ground_truth.txt``
  (ILSVRC2012_IDs, mapped to WordNet ids through the devkit's ``meta.mat`` or ``map_clsloc.txt``),
  Kaggle's ``LOC_val_solution.csv``, or a ``file label`` list (label = index 0..999 or a WordNet id);
* one subfolder per synset (``n01440764/...``);
* the pickled ``val224`` format of older benchmark repositories (dict with encoded images under ``data``
  and labels under ``target``), read with a restricted unpickler.

Labels are ImageNet-1k indices in sorted-WordNet-id order (what Keras and TensorFlow models output).
"""

from __future__ import annotations

import csv
import functools
import io
import os
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np

from quantship.data.classes import imagenet_classes, wnid_to_label
from quantship.data.datasets import FileRead, ImageDataset, Sample, register_dataset
from quantship.errors import DataError, UnsafePickleError
from quantship.fileio import read_text
from quantship.safe_pickle import load_val224_pickle

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
GROUND_TRUTH_NAMES = (
    "ILSVRC2012_validation_ground_truth.txt",
    "LOC_val_solution.csv",
    "val.txt",
    "labels.txt",
    "ground_truth.txt",
)
_WNID = re.compile(r"^n\d{8}$")


def _file_reader(path: Path) -> FileRead:
    return FileRead(path)


def _images_in(folder: Path) -> list[Path]:
    images = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
    check_links(images)
    return sorted(p for p in images if p.is_file())


def check_links(paths: list[Path]) -> None:
    """Refuse an image that is a symbolic link to nothing: left out, the data would quietly be a subset of what
    the user laid out (a link into a folder that is not mounted, a moved file).

    Raises:
        DataError: Naming the link and where it points.
    """
    for p in paths:
        if p.is_symlink() and not p.exists():
            raise DataError(
                f"{p}: a symbolic link to {os.readlink(p)}, which does not exist; restore its target or remove the link"
            )


def _parse_label(token: str, where: str) -> int:
    if _WNID.match(token):
        try:
            return wnid_to_label()[token]
        except KeyError:
            raise DataError(f"{where}: '{token}' is not an ImageNet-1k synset") from None
    try:
        label = int(token)
    except ValueError:
        raise DataError(f"{where}: label '{token}' is neither a class index nor a WordNet id") from None
    if not 0 <= label < 1000:
        raise DataError(f"{where}: class index {label} outside 0..999")
    return label


def _devkit_id_to_wnid(gt_file: Path) -> dict[int, str]:
    """ILSVRC2012_ID -> wnid from the devkit beside the ground-truth file (meta.mat or map_clsloc.txt)."""
    candidates = [gt_file.parent, gt_file.parent.parent, gt_file.parent / "data", gt_file.parent.parent / "data"]
    for folder in candidates:
        mapping = folder / "map_clsloc.txt"
        if mapping.is_file():
            out = {}
            for n, line in enumerate(read_text(mapping).splitlines(), 1):
                parts = line.split()
                if len(parts) >= 2:
                    try:
                        out[int(parts[1])] = parts[0]
                    except ValueError:
                        raise DataError(f"{mapping}:{n}: expected 'WNID ID NAME'") from None
            return out
        meta = folder / "meta.mat"
        if meta.is_file():
            from scipy.io import loadmat  # lazy (~0.3 s to import); MATLAB v5 reader: plain arrays, no code execution

            try:
                synsets = loadmat(str(meta), squeeze_me=True)["synsets"]
            except Exception as exc:  # noqa: BLE001 - scipy raises many types for a bad file
                raise DataError(f"{meta}: unreadable devkit meta file ({exc})") from None
            return {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
    raise DataError(
        f"{gt_file}: devkit ground truth holds ILSVRC2012_IDs, which need the devkit's data/meta.mat (or "
        f"map_clsloc.txt) to map to classes; none found beside it. Copy meta.mat next to the file, or give a "
        f"'file label' list with --labels"
    )


def _read_ground_truth(gt: Path, images: list[Path]) -> dict[str, int]:
    """Return {image file name (or stem, for the CSV): label} from any supported ground-truth file."""
    where = str(gt)
    if not gt.is_file():
        raise DataError(f"ground-truth file not found: {gt}")
    text = read_text(gt)
    if gt.suffix.lower() == ".csv":
        out: dict[str, int] = {}
        seen: dict[str, int] = {}
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if not reader.fieldnames or not {"ImageId", "PredictionString"} <= set(reader.fieldnames):
            raise DataError(f"{gt}: expected columns ImageId,PredictionString (LOC_val_solution.csv)")
        for n, row in enumerate(reader, 2):
            tokens = (row["PredictionString"] or "").split()
            if not tokens:
                raise DataError(f"{gt}:{n}: empty PredictionString for {row['ImageId']}")
            _add_label(out, seen, row["ImageId"], _parse_label(tokens[0], f"{where}:{n}"), gt, n)
        return out  # keyed by ImageId, the file name without extension
    numbered = [(n, ln.strip()) for n, ln in enumerate(text.splitlines(), 1)]
    numbered = [(n, ln) for n, ln in numbered if ln and not ln.startswith("#")]
    lines = [ln for _, ln in numbered]
    if lines and all(len(ln.split()) == 1 for ln in lines):
        # The devkit format: one ILSVRC2012_ID per line, in the order of the sorted image file names.
        if len(lines) != len(images):
            raise DataError(
                f"{gt}: {len(lines)} labels for {len(images)} images; the devkit ground truth lists one ID per "
                f"validation image in file-name order, so the folder must hold exactly those images"
            )
        id_to_wnid = _devkit_id_to_wnid(gt)
        out = {}
        for (n, line), img in zip(numbered, images):
            try:
                wnid = id_to_wnid[int(line)]
            except (ValueError, KeyError):
                raise DataError(f"{gt}:{n}: '{line}' is not a valid ILSVRC2012_ID") from None
            out[img.name] = _parse_label(wnid, f"{where}:{n}")
        return out
    out = {}
    seen = {}
    for n, line in numbered:
        parts = line.rsplit(None, 1)
        if len(parts) != 2:
            raise DataError(f"{gt}:{n}: expected 'FILE LABEL', got '{line}'")
        _add_label(out, seen, Path(parts[0]).name, _parse_label(parts[1], f"{where}:{n}"), gt, n)
    return out


def _add_label(out: dict[str, int], seen: dict[str, int], name: str, label: int, gt: Path, line: int) -> None:
    """One ground-truth entry; the same file with two different labels is an error naming both lines."""
    if name in out and out[name] != label:
        raise DataError(
            f"{gt}: {name} has two different labels, {out[name]} (line {seen[name]}) and {label} (line {line}); "
            "keep one"
        )
    out[name] = label
    seen.setdefault(name, line)


def _find_ground_truth(folder: Path) -> Path | None:
    for base in (folder, folder.parent):
        for name in GROUND_TRUTH_NAMES:
            if (base / name).is_file():
                return base / name
    return None


def _load_folder_with_labels(folder: Path, labels: Path | None, allow_missing_images: bool = False) -> ImageDataset:
    images = _images_in(folder)
    if not images:
        raise DataError(f"{folder}: no images (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    gt = labels or _find_ground_truth(folder)
    if gt is None:
        raise DataError(
            f"{folder}: no ground truth found (looked for {', '.join(GROUND_TRUTH_NAMES)} in the folder and its "
            "parent); pass --labels FILE"
        )
    table = _read_ground_truth(Path(gt), images)
    missing = [p.name for p in images if p.name not in table and p.stem not in table]
    if missing:
        raise DataError(f"{gt}: no label for {len(missing)} image(s) in {folder}, e.g. {missing[0]}")
    present = {p.name for p in images} | {p.stem for p in images}
    absent = [name for name in table if name not in present]
    if absent and not allow_missing_images:
        raise DataError(
            f"{gt}: lists {len(absent)} file(s) that are not in {folder} (e.g. {', '.join(absent[:3])}); copy them "
            f"there, or pass --allow-missing-images to evaluate the {len(images)} present"
        )
    samples = [Sample(str(p.resolve()), table.get(p.name, table.get(p.stem)), _file_reader(p)) for p in images]
    meta = {"ground_truth": str(gt), "missing_images": len(absent)}
    return ImageDataset("imagenet", str(folder), samples, meta=meta)


def _load_synset_folders(folder: Path, dirs: list[Path]) -> ImageDataset:
    lookup = wnid_to_label()
    if all(d.name in lookup for d in dirs):
        label_of = {d.name: lookup[d.name] for d in dirs}
        class_names = None
    else:
        unknown = [d.name for d in dirs if d.name not in lookup]
        if any(_WNID.match(u) for u in unknown):
            raise DataError(f"{folder}: '{unknown[0]}' is not an ImageNet-1k synset")
        # A generic one-folder-per-class dataset: labels follow the sorted folder names.
        label_of = {d.name: i for i, d in enumerate(dirs)}
        class_names = [d.name for d in dirs]
    samples = []
    for d in dirs:
        samples += [Sample(str(p.resolve()), label_of[d.name], _file_reader(p)) for p in _images_in(d)]
    if not samples:
        raise DataError(f"{folder}: class folders hold no images")
    meta: dict[str, Any] = {"layout": "class-folders"}
    if class_names:
        meta["class_names"] = class_names
    return ImageDataset("imagenet", str(folder), samples, meta=meta)


def _load_val224(path: Path) -> ImageDataset:
    try:
        obj = _cached_val224(str(path.resolve()), path.stat().st_mtime_ns)
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise DataError(f"{path}: not a readable val224 pickle ({exc})") from None
    if not isinstance(obj, dict) or "data" not in obj or "target" not in obj:
        raise DataError(f"{path}: expected a dict with 'data' and 'target' entries")
    data, target = obj["data"], obj["target"]
    for key, value in (("data", data), ("target", target)):
        if not isinstance(value, (list, tuple, np.ndarray)) or (isinstance(value, np.ndarray) and value.ndim == 0):
            raise DataError(
                f"{path}: '{key}' must be a list (one entry per image), got {type(value).__name__} {_brief(value)}"
            )
    if len(data) != len(target):
        raise DataError(f"{path}: {len(data)} images but {len(target)} labels")
    samples = []
    for i, (blob, label) in enumerate(zip(data, target)):
        if isinstance(blob, np.ndarray) and blob.dtype == np.uint8:
            raw = blob.tobytes()
        elif isinstance(blob, (bytes, bytearray)):
            raw = bytes(blob)
        else:
            raise DataError(f"{path}: data[{i}] must be an encoded image (bytes), got {type(blob).__name__}")
        lab = label.decode(errors="replace") if isinstance(label, bytes) else label
        lab = _parse_label(str(int(lab)) if isinstance(lab, (int, np.integer)) else str(lab), f"{path}[{i}]")
        samples.append(Sample(f"{path.resolve()}#{i}", lab, (lambda r=raw: r)))
    return ImageDataset("imagenet", str(path), samples, meta={"layout": "val224-pickle"})


def _brief(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


@functools.lru_cache(maxsize=2)
def _cached_val224(path: str, _mtime: int) -> Any:
    return load_val224_pickle(path)


@register_dataset("imagenet")
def load_imagenet(path: Path, labels: str | Path | None = None, allow_missing_images: bool = False) -> ImageDataset:
    """Open ImageNet-format data at ``path`` (folder or ``.pkl``), finding the format by itself.

    Args:
        path: Folder of validation images, folder of synset folders, or a val224 pickle.
        labels: Ground-truth file for a flat folder; by default a known one inside the folder is used.
        allow_missing_images: Evaluate the images present when the ground truth lists files the folder lacks
            (their number is in ``meta['missing_images']``); by default that is an error.

    Raises:
        DataError: Missing folder, no images, missing or malformed ground truth.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"dataset not found: {path}")
    if path.is_file():
        if path.suffix.lower() in (".pkl", ".pickle"):
            return _load_val224(path)
        raise DataError(f"{path}: a file that is not a val224 pickle (.pkl); give the image folder instead")
    dirs = sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    if labels is None and dirs and not _images_in(path):
        return _load_synset_folders(path, dirs)
    return _load_folder_with_labels(path, Path(labels) if labels else None, allow_missing_images)


__all__ = ["load_imagenet", "imagenet_classes"]
