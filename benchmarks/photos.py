"""Evaluation and calibration images without a dataset: scikit-image's photos and seeded crops/flips of them,
written as ImageNet-format folders (label 0: only agreement with fp32 is measured on them).

Calibration and evaluation come from different photos, so no evaluation image (nor any crop of its photo) is
used for calibration. The crops of one photo are correlated: an interval computed as if the images were
independent is narrower than the truth.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from quantship.jobs.demo import CALIB_PHOTOS  # the demo's calibration photos

# The photos scikit-image ships without a download, other than the calibration ones.
EVAL_PHOTOS = (
    "chelsea",
    "coffee",
    "rocket",
    "motorcycle_left",
    "motorcycle_right",
    "colorwheel",
    "logo",
    "page",
    "text",
    "cell",
    "horse",
)


def photo(name: str) -> np.ndarray:
    """An RGB uint8 photo by name (grey and binary images repeated over three channels)."""
    from skimage import data

    if name.startswith("motorcycle_"):
        img = data.stereo_motorcycle()[0 if name.endswith("left") else 1]
    else:
        img = getattr(data, name)()
    img = np.asarray(img)
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3].astype(np.uint8))


def crops(img: np.ndarray, n: int, rng: np.random.Generator, min_scale: float = 0.3) -> list[np.ndarray]:
    """``n`` seeded crops (side min_scale..1 of the shorter side, aspect 3:4..4:3), every other one mirrored."""
    h, w = img.shape[:2]
    out = []
    for i in range(n):
        side = rng.uniform(min_scale, 1.0) * min(h, w)
        aspect = rng.uniform(0.75, 4 / 3)
        ch, cw = min(h, int(side / np.sqrt(aspect))), min(w, int(side * np.sqrt(aspect)))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        c = img[y : y + ch, x : x + cw]
        out.append(np.ascontiguousarray(c[:, ::-1] if i % 2 else c))
    return out


def _png(img: np.ndarray) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes()


def write_folder(root: Path, images: dict[str, np.ndarray]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for name, img in images.items():
        path = root / f"{name}.png"
        if not path.exists():
            path.write_bytes(_png(img))
        lines.append(f"{name}.png 0\n")
    (root / "labels.txt").write_text("".join(lines))
    return root


def write_photo_sets(root: Path, eval_images: int = 500, calib_images: int = 100, seed: int = 0) -> tuple[Path, Path]:
    """``root/calib`` (crops of :data:`CALIB_PHOTOS`) and ``root/eval`` (the photos of :data:`EVAL_PHOTOS` and
    crops of them, ``eval_images`` in all)."""
    rng = np.random.default_rng(seed)
    calib: dict[str, np.ndarray] = {}
    per = -(-calib_images // len(CALIB_PHOTOS))
    for name in CALIB_PHOTOS:
        for k, c in enumerate(crops(photo(name), per, rng, min_scale=0.5)):
            if len(calib) < calib_images:
                calib[f"{name}_{k:03d}"] = c
    evals: dict[str, np.ndarray] = {}
    photos = {name: photo(name) for name in EVAL_PHOTOS}
    evals.update({f"{name}_full": img for name, img in photos.items()})
    per = -(-(eval_images - len(evals)) // len(photos))
    for name, img in photos.items():
        for k, c in enumerate(crops(img, per, rng)):
            if len(evals) < eval_images:
                evals[f"{name}_{k:03d}"] = c
    return write_folder(root / "eval", evals), write_folder(root / "calib", calib)
