"""``images:PATH``: a folder of images without labels (searched recursively, in sorted path order).

Such data can only be calibration data (``--calib-data images:PATH``, or ``--data`` of ``convert``,
``calibrate`` and ``bench``): evaluation refuses it (:func:`quantship.data.datasets.require_labelled`).
"""

from __future__ import annotations

from pathlib import Path

from quantship.data.datasets import FileRead, ImageDataset, Sample, register_dataset
from quantship.data.imagenet import IMAGE_SUFFIXES, check_links
from quantship.errors import DataError


def image_files(folder: Path) -> list[Path]:
    """Every image file under ``folder`` (hidden files and folders left out), sorted by relative path."""
    out = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder).parts
        if p.suffix.lower() in IMAGE_SUFFIXES and not any(part.startswith(".") for part in rel):
            check_links([p])
            if p.is_file():
                out.append(p)
    return sorted(out, key=lambda p: p.relative_to(folder).as_posix())


@register_dataset("images", labelled=False)
def load_images(path: Path, labels: str | Path | None = None) -> ImageDataset:
    """Open a folder of unlabelled images.

    Raises:
        DataError: The folder is missing or holds no image, or a label file is given.
    """
    path = Path(path)
    if labels is not None:
        raise DataError(f"images:{path} is a folder without labels; --labels does not apply to it")
    if not path.is_dir():
        raise DataError(f"image folder not found: {path}" if not path.exists() else f"{path}: not a folder")
    files = image_files(path)
    if not files:
        raise DataError(
            f"{path}: no images (looked recursively for {', '.join(sorted(IMAGE_SUFFIXES))}); give a folder of "
            "calibration images"
        )
    samples = [Sample(str(p.resolve()), None, FileRead(p)) for p in files]
    return ImageDataset("images", str(path), samples, meta={"labelled": False})
