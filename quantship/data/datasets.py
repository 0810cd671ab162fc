"""Dataset interface, registry, calibration split and the parallel batch loader."""

from __future__ import annotations

import collections
import concurrent.futures as cf
import hashlib
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from quantship.config import PreprocessSpec
from quantship.data.cache import default_input_cache
from quantship.data.preprocess import InputEncoding, crop_views, decode_image, image_views
from quantship.errors import ConfigError, DataError
from quantship.fileio import read_text
from quantship.lazy import lazy_import


class FileRead:
    """Reads one file's bytes; keeps the path, so a listing can stat the file without reading it."""

    __slots__ = ("path",)

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __call__(self) -> bytes:
        return self.path.read_bytes()


@dataclass(frozen=True)
class Sample:
    """One image: a stable key (resolved path or ``file#index``), its label, and how to read its bytes."""

    key: str
    label: Any
    read: Callable[[], bytes] = field(compare=False, repr=False)

    @property
    def path(self) -> Path | None:
        """The image file, when the sample is one (a :class:`FileRead`); None for images held in memory."""
        return getattr(self.read, "path", None)

    def stat(self) -> tuple[int, int]:
        """(size in bytes, mtime in ns) of the file; (size, 0) for an image held in memory."""
        if self.path is not None:
            st = os.stat(self.path)
            return st.st_size, st.st_mtime_ns
        return len(self.read()), 0


class _Origin:
    """The full listing a dataset and all its subsets come from: file sizes and mtimes are read once (for the
    listing hash of the input cache and for the disjointness check) and shared by every subset."""

    def __init__(self, samples: list[Sample], source: str):
        self.samples, self.source = samples, source
        self._stats: list[tuple[int, int] | None] = [None] * len(samples)
        self._hash: str | None = None

    def stat(self, pos: int) -> tuple[int, int]:
        st = self._stats[pos]
        if st is None:
            try:
                st = self.samples[pos].stat()
            except OSError:
                st = (-1, 0)  # unreadable: never equal to a real file, and skipped when decoded
            self._stats[pos] = st
        return st

    def listing_hash(self) -> str:
        """Hash of every sample's key, size and mtime (and the stat of a source file such as a pickle)."""
        if self._hash is None:
            h = hashlib.sha256()
            src = Path(self.source)
            if src.is_file():
                st = src.stat()
                h.update(f"{src.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            for pos, s in enumerate(self.samples):
                size, mtime = self.stat(pos)
                h.update(f"{s.key}\0{size}\0{mtime}\n".encode())
            self._hash = h.hexdigest()[:20]
        return self._hash


@dataclass
class ImageDataset:
    """An ordered list of samples with a declared task (``classification`` or ``detection``).

    A subset remembers where its samples sit in the dataset it was taken from (:meth:`positions`), so every
    subset (evaluation split, calibration draw, sign-off chunk) shares one entry of the input cache.
    """

    name: str
    source: str
    samples: list[Sample]
    task: str = "classification"
    meta: dict[str, Any] = field(default_factory=dict)
    _origin: _Origin | None = field(default=None, repr=False, compare=False)
    _positions: list[int] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self._origin is None:
            self._origin, self._positions = _Origin(self.samples, self.source), None

    def __len__(self) -> int:
        return len(self.samples)

    def subset(self, indices: Sequence[int], name: str | None = None) -> "ImageDataset":
        pos = self.positions()
        return ImageDataset(
            name or self.name,
            self.source,
            [self.samples[i] for i in indices],
            self.task,
            self.meta,
            self._origin,
            [pos[i] for i in indices],
        )

    def positions(self) -> list[int]:
        """Where each sample sits in the full listing this dataset was taken from."""
        return list(range(len(self.samples))) if self._positions is None else list(self._positions)

    @property
    def origin(self) -> _Origin:
        assert self._origin is not None
        return self._origin

    @property
    def labelled(self) -> bool:
        """False for data without ground truth (``images:``), which can only be calibration data."""
        return bool(self.meta.get("labelled", True))

    def stats(self) -> list[tuple[int, int]]:
        """(size, mtime) of each sample's file, read once per listing."""
        return [self.origin.stat(p) for p in self.positions()]

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
_TASKS: dict[str, str] = {}
_UNLABELLED: set[str] = set()


def register_dataset(
    kind: str, task: str = "classification", labelled: bool = True
) -> Callable[[DatasetLoader], DatasetLoader]:
    """Decorator: register a loader for ``--data KIND:PATH`` whose datasets have ``task`` (``labelled=False``:
    data without ground truth, usable only where labels are not needed, i.e. calibration)."""

    def deco(fn: DatasetLoader) -> DatasetLoader:
        _DATASETS[kind] = fn
        _TASKS[kind] = task
        if not labelled:
            _UNLABELLED.add(kind)
        return fn

    return deco


def _kind(spec: str, option: str = "--data") -> str:
    # Lazy on purpose (a cycle): these modules import this one to register their loaders with it.
    from quantship.data import detection, imagenet, images  # noqa: F401  (registers loaders)

    kind, sep, path = spec.partition(":")
    if not sep or not path:
        raise ConfigError(f"{option} must look like KIND:PATH (e.g. imagenet:/data/val), got '{spec}'")
    if kind not in _DATASETS:
        raise ConfigError(f"{option}: unknown dataset kind '{kind}'; known: {', '.join(sorted(_DATASETS))}")
    return kind


def dataset_task(spec: str) -> str:
    """The task of the data ``KIND:PATH`` names, without opening it (for checks before any work)."""
    return _TASKS[_kind(spec)]


def load_dataset(spec: str, allow_missing_images: bool = False, option: str = "--data", **kwargs: Any) -> ImageDataset:
    """Open ``KIND:PATH`` (e.g. ``imagenet:/data/val``) with the registered loader.

    Args:
        allow_missing_images: Evaluate the images present when the ground truth lists files that are missing
            (the loader records how many in ``meta['missing_images']``); by default that is an error.
        option: The option that named the data, for messages (``--data``, ``--calib-data``).
    """
    kind = _kind(spec, option)
    if allow_missing_images:
        kwargs["allow_missing_images"] = True
    if kwargs.get("labels") is not None:  # named before the data is looked at ("no images" would mislead)
        labels = Path(kwargs["labels"]).expanduser()
        if not labels.exists():
            raise DataError(f"--labels {labels}: file not found; give the ground-truth file")
        if not labels.is_file():
            raise DataError(f"--labels {labels}: is a folder, not a file; give the ground-truth file")
    return _DATASETS[kind](Path(spec.partition(":")[2]).expanduser(), **kwargs)


def labelled_kind(spec: str, option: str = "--data") -> bool:
    """Whether data ``KIND:PATH`` has ground truth (False for ``images:``), on the name alone."""
    return _kind(spec, option) not in _UNLABELLED


def require_labelled(spec: str, option: str = "--data") -> None:
    """Refuse evaluation data without ground truth (checked on the name alone, before any work).

    Raises:
        ConfigError: ``spec`` is of a kind registered as unlabelled (``images:``).
    """
    kind = _kind(spec, option)
    if kind in _UNLABELLED:
        raise ConfigError(
            f"{option} {spec}: '{kind}:' data has no labels, so it can only be calibration data (--calib-data "
            f"{spec}); evaluate on labelled data ({', '.join(sorted(set(_DATASETS) - _UNLABELLED))})"
        )


def read_file_list(path: str | os.PathLike) -> list[str]:
    """File names of a calibration list (MLPerf's format: one name or relative path per line; blank lines,
    ``#`` comments and anything after the first word are ignored).

    Raises:
        DataError: The file is missing, unreadable or names nothing.
    """

    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"calibration list not found: {p}")
    text = read_text(p)  # UTF-8, a byte-order mark accepted (Windows editors write one)
    names = [ln.split()[0] for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not names:
        raise DataError(f"{p}: the calibration list names no files (one file name per line)")
    return names


def file_list_hash(path: str | os.PathLike) -> str:
    """SHA-256 (16 hex digits) of a list file's bytes, as recorded in manifests."""
    return hashlib.sha256(Path(path).expanduser().read_bytes()).hexdigest()[:16]


def select_listed(dataset: ImageDataset, list_path: str | os.PathLike) -> ImageDataset:
    """The samples of ``dataset`` named by a calibration list, in the dataset's order.

    A line matches a file by name (``n01440764_10026.JPEG``) or by its path relative to the dataset folder
    (``n01440764/n01440764_10026.JPEG``).

    Raises:
        DataError: The list names a file the dataset does not hold, or a name several of its files share.
    """
    names = read_file_list(list_path)
    by_name: dict[str, list[int]] = {}
    for i, s in enumerate(dataset.samples):
        if s.path is None:
            raise DataError(f"{dataset.source}: its images have no file names, so a calibration list cannot name them")
        by_name.setdefault(s.path.name, []).append(i)
    chosen: set[int] = set()
    missing = []
    for entry in names:
        rel = entry.replace("\\", "/").removeprefix("./")
        found = by_name.get(rel.rsplit("/", 1)[-1], [])
        if "/" in rel:
            found = [i for i in found if dataset.samples[i].path.as_posix().endswith("/" + rel)]
        if not found:
            missing.append(entry)
        elif len(found) > 1:
            raise DataError(
                f"{list_path}: '{entry}' matches {len(found)} files of {dataset.source} (e.g. "
                f"{dataset.samples[found[0]].path}); give paths relative to the folder"
            )
        else:
            chosen.add(found[0])
    if missing:
        raise DataError(
            f"{list_path}: {len(missing)} of {len(names)} listed file(s) not found in {dataset.source} (e.g. "
            f"{missing[0]}); the list must name files of the calibration data"
        )
    return dataset.subset(sorted(chosen), f"{dataset.name}-listed")


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
        # File sizes first (one stat per file, kept with the listing); bytes are read only on a size match,
        # so a 50,000-image evaluation set is not read again on every run.
        by_size: dict[int, list[Sample]] = {}
        for s, (size, _) in zip(calib.samples, calib.stats()):
            by_size.setdefault(size, []).append(s)
        calib_bytes: dict[str, bytes] = {}
        for s, (size, _) in zip(evaluation.samples, evaluation.stats()):
            if size < 0 or size not in by_size:
                continue
            data = s.read()
            for c in by_size[size]:
                if c.key not in calib_bytes:
                    calib_bytes[c.key] = c.read()
                if calib_bytes[c.key] == data:
                    same.append(s.key)
                    break
    if same:
        raise DataError(
            f"{len(same)} calibration image(s) are also evaluation images (e.g. {same[0]}); calibration data "
            "must be disjoint from evaluation data"
        )


class Batch:
    """A batch of images: uint8 RGB pixels of every view (``pixels``, (B, views, H, W, 3)) turned into model
    inputs on demand (:meth:`encoded`; ``inputs`` is the float32 one), plus keys and labels.

    A batch made from float inputs alone (``inputs``) serves float32 encodings only.
    """

    def __init__(
        self,
        keys: list[str],
        inputs: np.ndarray | None = None,
        labels: list[Any] | None = None,
        images: list[np.ndarray] | None = None,
        pixels: np.ndarray | None = None,
        spec: PreprocessSpec | None = None,
    ):
        if inputs is None and (pixels is None or spec is None):
            raise ValueError("a batch needs float inputs, or pixels and the spec that normalises them")
        self.keys, self.labels, self.images = keys, list(labels or []), images
        self.pixels, self.spec = pixels, spec
        self._inputs = inputs
        self._encoded: dict[InputEncoding, np.ndarray] = {}

    @property
    def inputs(self) -> np.ndarray:
        """(B, views, *input_shape) float32, normalised as the spec says."""
        if self._inputs is None:
            self._inputs = self.encoded(InputEncoding.of(self.spec))
        return self._inputs

    def encoded(self, encoding: InputEncoding) -> np.ndarray:
        """The model input for ``encoding`` (computed once per batch and encoding, shared by the targets)."""
        if encoding not in self._encoded:
            if self.pixels is not None:
                x = encoding(self.pixels)
            elif encoding.quantized:
                info = np.iinfo(encoding.dtype)
                q = np.round(self.inputs / encoding.scale) + encoding.zero_point
                x = np.clip(q, info.min, info.max).astype(encoding.dtype)
            else:
                x = self.inputs
            self._encoded[encoding] = x
        return self._encoded[encoding]


@dataclass
class Skipped:
    key: str
    reason: str


DEFAULT_CACHE: Any = object()  # iter_batches: use the process's configured input cache


def _pixels(entry: Any, views: list[np.ndarray], hits: list[int]) -> np.ndarray:
    """A batch's pixels: consecutive rows of one cache shard as they are mapped (no copy), else stacked."""
    if entry is not None and hits[0] >= 0 and all(h == hits[0] + i for i, h in enumerate(hits)):
        block = entry.block(hits[0], len(hits))
        if block is not None:
            return block
    return np.stack(views)


def _decode(sample: Sample, spec: PreprocessSpec, keep_images: bool) -> tuple[Any, str | None]:
    """Read and decode one image: ((its uint8 views, the decoded image or None), None), or (None, why it could not
    be read)."""
    try:
        data = sample.read()
    except OSError as exc:
        return None, f"cannot read: {exc}"
    try:
        if keep_images:
            img = decode_image(data, sample.key)
            return (np.stack(crop_views(img, spec)), img), None
        return (image_views(data, spec, sample.key), None), None
    except DataError as exc:
        return None, str(exc)


def _cache_entry(cache: Any, dataset: ImageDataset, spec: PreprocessSpec, keep_images: bool) -> Any:
    """The input cache entry of ``dataset`` under ``spec`` (``DEFAULT_CACHE``: the process's cache); None without a
    cache, with ``keep_images`` or for an empty dataset."""
    if cache is DEFAULT_CACHE:
        cache = default_input_cache()
    return cache.entry(dataset, spec) if cache is not None and not keep_images and len(dataset) else None


class _Prefetcher:
    """A dataset's images in order, each as (sample, position, cached views or the Future of its decoding), kept
    ``ahead`` images in advance: taking one queues the next."""

    def __init__(self, dataset: ImageDataset, entry: Any, submit: Callable[[Sample], cf.Future], ahead: int):
        self.samples, self.positions = dataset.samples, dataset.positions()
        self.entry, self.submit = entry, submit
        self.pending: collections.deque = collections.deque()
        self.nxt = 0
        while self.nxt < len(self.samples) and len(self.pending) < ahead:
            self._enqueue()

    def _enqueue(self) -> None:
        """Queue the next image: its views from the cache, else its decoding submitted."""
        s, pos = self.samples[self.nxt], self.positions[self.nxt]
        self.nxt += 1
        hit = self.entry.get(pos) if self.entry is not None else None
        self.pending.append((s, pos, hit) if hit is not None else (s, pos, self.submit(s)))

    def __iter__(self) -> Iterator[tuple[Sample, int, Any]]:
        while self.pending:
            item = self.pending.popleft()
            if self.nxt < len(self.samples):
                self._enqueue()
            yield item


def _resolve(
    sample: Sample, pos: int, item: Any, entry: Any, skipped: list[Skipped] | None
) -> tuple[np.ndarray, Any, bool] | None:
    """(views, decoded image or None, whether they came from the cache) of a queued image; a decoded one is added
    to the cache, one that could not be read is recorded in ``skipped`` and gives None."""
    if not isinstance(item, cf.Future):
        return item, None, True
    result, reason = item.result()
    if result is None:
        if skipped is not None:
            skipped.append(Skipped(sample.key, reason or "unreadable"))
        return None
    views, img = result
    if entry is not None:
        entry.add(pos, views)
    return views, img, False


class _BatchParts:
    """The images of the batch being put together."""

    def __init__(self, keep_images: bool):
        self.keep_images = keep_images
        self._reset()

    def _reset(self) -> None:
        """Start an empty batch."""
        self.keys: list[str] = []
        self.labels: list[Any] = []
        self.views: list[np.ndarray] = []
        self.images: list[np.ndarray] = []
        self.hits: list[int] = []  # listing position of each image read from the cache, -1 for a decoded one

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, sample: Sample, pos: int, views: np.ndarray, img: Any, cached: bool) -> None:
        """Add one image's views (and, decoded with ``keep_images``, the image itself)."""
        if not cached and self.keep_images:
            self.images.append(img)
        self.keys.append(sample.key)
        self.labels.append(sample.label)
        self.views.append(views)
        self.hits.append(pos if cached else -1)

    def take(self, entry: Any, spec: PreprocessSpec) -> Batch:
        """The batch of the images added so far; the next one starts empty."""
        batch = Batch(self.keys, None, self.labels, self.images or None, _pixels(entry, self.views, self.hits), spec)
        self._reset()
        return batch


def iter_batches(
    dataset: ImageDataset,
    spec: PreprocessSpec,
    batch_size: int,
    workers: int = 4,
    skipped: list[Skipped] | None = None,
    keep_images: bool = False,
    cache: Any = DEFAULT_CACHE,
) -> Iterator[Batch]:
    """Yield batches of the spec's uint8 views of every image, in dataset order.

    Images found in the input cache (:mod:`quantship.data.cache`) are read from its memory-mapped shards;
    the others are decoded, resized and cropped in a thread pool (OpenCV releases the GIL) and added to the
    cache. Normalisation happens when a batch's inputs are asked for. Unreadable images are not fatal: each
    is appended to ``skipped`` with the reason and left out of the batches. Up to three batches are prepared
    ahead so the consumer (the runtime) sets the pace.

    Args:
        cache: An :class:`~quantship.data.cache.InputCache`, None for none, or the process's default.
        keep_images: Also return the decoded RGB images (bypasses the cache).
    """
    if batch_size <= 0:
        raise ConfigError(f"batch size must be positive, got {batch_size}")
    cv2 = lazy_import("cv2", "opencv-python-headless")
    cv2.setNumThreads(1)  # the pool already runs one image per thread
    entry = _cache_entry(cache, dataset, spec, keep_images)
    with cf.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        queue = _Prefetcher(dataset, entry, lambda s: pool.submit(_decode, s, spec, keep_images), batch_size * 3)
        parts = _BatchParts(keep_images)
        try:
            for sample, pos, item in queue:
                got = _resolve(sample, pos, item, entry, skipped)
                if got is None:
                    continue
                parts.add(sample, pos, *got)
                if len(parts) == batch_size:
                    yield parts.take(entry, spec)
            if len(parts):
                yield parts.take(entry, spec)
        finally:
            if entry is not None:
                entry.flush()
