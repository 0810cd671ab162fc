"""Dataset interface, registry, calibration split and the parallel batch loader."""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from quantship.config import ChannelOrder, PreprocessSpec
from quantship.data.preprocess import decode_image, preprocess_image
from quantship.errors import ConfigError, DataError
from quantship.lazy import lazy_import


@dataclass(frozen=True)
class Sample:
    """One image: a stable key (resolved path or ``file#index``), its label, and how to read its bytes."""

    key: str
    label: Any
    read: Callable[[], bytes] = field(compare=False, repr=False)


@dataclass
class ImageDataset:
    """An ordered list of samples with a declared task (``classification`` or ``detection``)."""

    name: str
    source: str
    samples: list[Sample]
    task: str = "classification"
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.samples)

    def subset(self, indices: Sequence[int], name: str | None = None) -> "ImageDataset":
        return ImageDataset(name or self.name, self.source, [self.samples[i] for i in indices], self.task, self.meta)

    def keys_hash(self) -> str:
        """Hash of the sample keys: identifies exactly which images a result or calibration used."""
        h = hashlib.sha256()
        for s in self.samples:
            h.update(s.key.encode())
            h.update(b"\0")
        return h.hexdigest()[:16]

    def listing_hash(self) -> str:
        """Hash of what the images are, without reading them: each key with its file's size and modification
        time (the container file's, for images stored inside one), and each label's value. A replaced image
        or an edited ground truth changes it."""
        h = hashlib.sha256()
        stats: dict[str, tuple[int, int]] = {}
        for s in self.samples:
            path = s.key.split("#", 1)[0]
            if path not in stats:
                try:
                    st = os.stat(path)
                    stats[path] = (st.st_size, st.st_mtime_ns)
                except OSError:
                    stats[path] = (-1, -1)
            h.update(f"{s.key}\0{stats[path][0]}\0{stats[path][1]}\0{_label_digest(s.label)}\n".encode())
        return h.hexdigest()[:16]


def _label_digest(label: Any) -> str:
    if isinstance(label, dict):
        return hashlib.sha256(
            repr(
                sorted((k, np.asarray(v).tobytes() if isinstance(v, np.ndarray) else v) for k, v in label.items())
            ).encode()
        ).hexdigest()[:16]
    return repr(label)


DatasetLoader = Callable[..., ImageDataset]
_DATASETS: dict[str, DatasetLoader] = {}


def register_dataset(kind: str) -> Callable[[DatasetLoader], DatasetLoader]:
    """Decorator: register a loader for ``--data KIND:PATH``."""

    def deco(fn: DatasetLoader) -> DatasetLoader:
        _DATASETS[kind] = fn
        return fn

    return deco


def load_dataset(spec: str, **kwargs: Any) -> ImageDataset:
    """Open ``KIND:PATH`` (e.g. ``imagenet:/data/val``) with the registered loader."""
    from quantship.data import detection, imagenet  # noqa: F401  (registers loaders)

    kind, sep, path = spec.partition(":")
    if not sep or not path:
        raise ConfigError(f"--data must look like KIND:PATH (e.g. imagenet:/data/val), got '{spec}'")
    if kind not in _DATASETS:
        raise ConfigError(f"unknown dataset kind '{kind}'; known: {', '.join(sorted(_DATASETS))}")
    return _DATASETS[kind](Path(path).expanduser(), **kwargs)


def split_calibration(
    dataset: ImageDataset, num_calib: int, limit: int | None = None, seed: int = 0
) -> tuple[ImageDataset, ImageDataset]:
    """Split into (calibration, evaluation), disjoint by construction.

    Evaluation takes the first ``limit`` images (all not drawn for calibration when ``limit`` is None);
    calibration draws ``num_calib`` images at random (seeded) from the rest.

    Raises:
        DataError: The dataset has fewer images than the two splits need.
    """
    n = len(dataset)
    if limit is not None and limit <= 0:
        raise ConfigError(f"--limit must be positive, got {limit}")
    need = (limit or 1) + num_calib
    if n < need:
        raise DataError(
            f"{dataset.source}: {n} images, but {limit or 'at least 1'} for evaluation + {num_calib} for "
            f"calibration were asked for; lower --limit or --calib-images"
        )
    rng = random.Random(seed)
    if limit is None:
        calib_idx = sorted(rng.sample(range(n), num_calib))
        chosen = set(calib_idx)
        eval_idx = [i for i in range(n) if i not in chosen]
    else:
        eval_idx = list(range(limit))
        calib_idx = sorted(rng.sample(range(limit, n), num_calib))
    calib = dataset.subset(calib_idx, f"{dataset.name}-calib")
    evaluation = dataset.subset(eval_idx, dataset.name)
    check_disjoint(calib, evaluation)
    return calib, evaluation


def check_disjoint(calib: ImageDataset, evaluation: ImageDataset) -> None:
    """Refuse calibration images that are also evaluation images (same key, or same bytes).

    Keys catch the same file; for calibration sets from another source the bytes of the (few) calibration
    images are hashed and compared with evaluation images of equal size.
    """
    eval_keys = {s.key for s in evaluation.samples}
    same = [s.key for s in calib.samples if s.key in eval_keys]
    if not same and calib.source != evaluation.source:
        calib_bytes = [s.read() for s in calib.samples]
        digests = {hashlib.sha256(b).hexdigest() for b in calib_bytes}
        sizes = {len(b) for b in calib_bytes}
        for s in evaluation.samples:
            data = s.read()
            if len(data) in sizes and hashlib.sha256(data).hexdigest() in digests:
                same.append(s.key)
    if same:
        raise DataError(
            f"{len(same)} calibration image(s) are also evaluation images (e.g. {same[0]}); calibration data "
            "must be disjoint from evaluation data"
        )


@dataclass
class Batch:
    keys: list[str]
    inputs: np.ndarray  # (B, views, *input_shape) float32
    labels: list[Any]
    images: list[np.ndarray] | None = None  # the decoded RGB images, when asked for


@dataclass
class Skipped:
    key: str
    reason: str


def iter_batches(
    dataset: ImageDataset,
    spec: PreprocessSpec,
    batch_size: int,
    workers: int = 4,
    skipped: list[Skipped] | None = None,
    prepare: Callable[[np.ndarray, PreprocessSpec], Any] = preprocess_image,
    keep_images: bool = False,
) -> Iterator[Batch]:
    """Decode and preprocess in a thread pool (OpenCV releases the GIL), yielding ready batches.

    Unreadable images are not fatal: each is appended to ``skipped`` with the reason and left out of the
    batches. Up to two batches are prepared ahead so the consumer (the runtime) sets the pace.
    """
    if batch_size <= 0:
        raise ConfigError(f"batch size must be positive, got {batch_size}")
    # The default path decodes to OpenCV's native BGR and folds the channel order into normalisation (no
    # colour conversion); OpenCV's own threads are off since the pool already runs one image per thread.
    fast = prepare is preprocess_image
    cv2 = lazy_import("cv2", "opencv-python-headless")
    cv2.setNumThreads(1)

    def load(sample: Sample):
        try:
            data = sample.read()
        except OSError as exc:
            return sample, None, f"cannot read: {exc}"
        try:
            img = decode_image(data, sample.key, ChannelOrder.BGR if fast else ChannelOrder.RGB)
        except DataError as exc:
            return sample, None, str(exc)
        x = preprocess_image(img, spec, ChannelOrder.BGR) if fast else prepare(img, spec)
        if keep_images and fast:
            img = np.ascontiguousarray(img[..., ::-1])
        return sample, (img if keep_images else None, x), None

    samples = dataset.samples
    with cf.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending: list[cf.Future] = []
        ahead = batch_size * 3
        it = iter(samples)
        for s in it:
            pending.append(pool.submit(load, s))
            if len(pending) >= ahead:
                break
        keys, inputs, labels, images = [], [], [], []
        while pending:
            sample, result, reason = pending.pop(0).result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(load, nxt))
            if result is None:
                if skipped is not None:
                    skipped.append(Skipped(sample.key, reason or "unreadable"))
                continue
            keys.append(sample.key)
            images.append(result[0])
            inputs.append(result[1])
            labels.append(sample.label)
            if len(keys) == batch_size:
                yield Batch(keys, np.stack(inputs), labels, images if keep_images else None)
                keys, inputs, labels, images = [], [], [], []
        if keys:
            yield Batch(keys, np.stack(inputs), labels, images if keep_images else None)
