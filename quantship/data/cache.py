"""The preprocessed-input cache: each image is decoded, resized and cropped once, for every target, sign-off
chunk and unit, sensitivity pass, calibration draw and later run.

What is kept is the spec's views of each image as uint8 RGB pixels, before normalisation, so one entry serves
every model that shares the geometry (size, crop, interpolation, views) whatever its mean/std, channel order,
layout or input type. Layout under the cache folder (default ``inputs/`` under the project cache folder)::

    <entry>/              one dataset listing x one preprocessing geometry (x the decoder's version)
      entry.json          what the entry holds; its mtime is the entry's last use (least recently used first)
      lock                flock: shared while a process uses the entry, exclusive (non-blocking) to evict it
      shard-<id>.npy      uint8 pixels (images, views, H, W, 3), memory-mapped when read
      shard-<id>.json     which images (positions in the listing) and the pixels' CRC-32; written last

The entry's name hashes the dataset listing (every file's key, size and mtime), so a changed, added or
removed file gives a new entry and the old one ages out. Shards are written while a pass decodes (no extra
pass), each atomically and complete before its index file appears; a shard whose file is short, malformed or
fails its CRC is deleted and its images are decoded again. Past ``max_bytes`` the least recently used entries
that no running process holds are deleted whole; when nothing more can go, the entry stops growing.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from quantship.config import InputCacheOptions, PreprocessSpec
from quantship.data.preprocess import geometry, num_views
from quantship.fileio import atomic_path, cache_dir, process_gone, sha256_json, temp_file_owner, write_json_atomic

if TYPE_CHECKING:
    from quantship.data.datasets import ImageDataset

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; eviction then never touches an entry another run may use
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("quantship")

FORMAT = 1
SHARD_BYTES = 64 << 20  # pixels per shard file (a few hundred images at 224x224)
STALE_SECONDS = 3600  # a temporary or unindexed shard file this old was left by a killed process


def _decoder_versions(spec: PreprocessSpec) -> dict[str, str]:
    import cv2

    out = {"opencv": cv2.__version__}
    if spec.interpolation.value == "bilinear_antialias":
        import PIL  # lazy: Pillow is an optional extra, needed only for bilinear_antialias

        out["pillow"] = PIL.__version__
    return out


def entry_name(dataset: "ImageDataset", spec: PreprocessSpec) -> str:
    """The cache entry of a dataset's full listing under a spec's geometry."""
    key = {
        "format": FORMAT,
        "listing": dataset.origin.listing_hash(),
        "geometry": geometry(spec),
        "decoder": _decoder_versions(spec),
    }
    return sha256_json(key)[:24]


def _dir_bytes(path: Path) -> int:
    total = 0
    with contextlib.suppress(FileNotFoundError):
        for p in path.iterdir():
            with contextlib.suppress(FileNotFoundError):
                total += p.stat().st_size
    return total


class _Shard:
    def __init__(self, name: str, positions: np.ndarray, crc: int, shape: tuple[int, ...]):
        self.name, self.positions, self.crc, self.shape = name, positions, crc, shape
        self.data: np.ndarray | None = None
        self.ok: bool | None = None  # None: not yet checked in this process


class CacheEntry:
    """One dataset listing under one geometry, held (shared lock) while this process lives or until closed."""

    def __init__(self, cache: "InputCache", path: Path, size: int, view_shape: tuple[int, ...], lock_fd: int | None):
        self.cache, self.path, self.size, self.view_shape = cache, path, size, view_shape
        self._lock_fd = lock_fd
        self._shards: list[_Shard] = []
        self._known: set[str] = set()
        self._where = np.full(size, -1, np.int64)  # shard index of each listing position, -1: not cached
        self._row = np.zeros(size, np.int64)
        self._mutex = threading.Lock()
        self._pending_pos: list[int] = []
        self._pending: list[np.ndarray] = []
        self._writes: list[cf.Future] = []
        self._writer = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="quantship-input-cache")
        per_image = int(np.prod(view_shape))
        self.shard_images = max(8, SHARD_BYTES // max(1, per_image))
        self.refresh()

    @property
    def cached(self) -> int:
        """How many images of the listing are in the cache (as far as this process knows)."""
        return int((self._where >= 0).sum())

    # -- reading ------------------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Pick up shards written since the entry was opened (by this process or another)."""
        for index in sorted(self.path.glob("shard-*.json")):
            name = index.name[: -len(".json")]
            if name in self._known:
                continue
            try:
                meta = json.loads(index.read_text())
                positions = np.asarray(meta["positions"], np.int64)
                shape = tuple(int(d) for d in meta["shape"])
                crc = int(meta["crc32"])
            except (OSError, ValueError, KeyError, TypeError):
                self._discard(name, "unreadable index")
                continue
            if (
                meta.get("format") != FORMAT
                or shape != (len(positions), *self.view_shape)
                or (positions.size and (positions.min() < 0 or positions.max() >= self.size))
            ):
                self._discard(name, "index does not fit the entry")
                continue
            self._register(_Shard(name, positions, crc, shape))

    def _register(self, shard: _Shard) -> None:
        with self._mutex:
            self._known.add(shard.name)
            self._shards.append(shard)
            k = len(self._shards) - 1
            self._where[shard.positions] = k
            self._row[shard.positions] = np.arange(len(shard.positions))

    def get(self, pos: int) -> np.ndarray | None:
        """The cached views of the image at listing position ``pos`` (a read-only memory-mapped array), or
        None when it is not cached (or its shard turned out corrupt: it is discarded)."""
        k = int(self._where[pos])
        if k < 0:
            return None
        shard = self._shards[k]
        if shard.ok is None:
            self._check(shard)
        if not shard.ok:
            return None
        return shard.data[self._row[pos]]

    def block(self, first: int, count: int) -> np.ndarray | None:
        """The cached views of listing positions ``first .. first+count-1`` as one memory-mapped array (no
        copy) when they are consecutive rows of one checked shard, else None."""
        k = int(self._where[first])
        if k < 0 or self._shards[k].ok is not True:
            return None
        last = first + count - 1
        r0 = int(self._row[first])
        if last >= self.size or int(self._where[last]) != k or int(self._row[last]) != r0 + count - 1:
            return None
        span = slice(first, last + 1)
        if not ((self._where[span] == k).all() and (np.diff(self._row[span]) == 1).all()):
            return None
        return self._shards[k].data[r0 : r0 + count]

    def _check(self, shard: _Shard) -> None:
        """Open a shard's pixels memory-mapped and verify shape and CRC once per process."""
        reason = None
        try:
            data = np.load(self.path / f"{shard.name}.npy", mmap_mode="r", allow_pickle=False)
            if data.dtype != np.uint8 or data.shape != shard.shape:
                reason = f"pixels {data.dtype}{data.shape}, index says uint8{shard.shape}"
            elif zlib.crc32(data) != shard.crc:
                reason = "CRC mismatch"
        except (OSError, ValueError, EOFError) as exc:  # EOFError: a zero-byte file (a full disk, a crash)
            reason = f"unreadable ({str(exc).strip()[:120] or type(exc).__name__})"
        if reason is None:
            shard.data, shard.ok = data, True
            return
        shard.ok = False
        log.warning(
            "input cache: shard %s of %s discarded (%s); its images are decoded again", shard.name, self.path, reason
        )
        with self._mutex:
            k = self._shards.index(shard)
            mine = self._where[shard.positions] == k
            self._where[shard.positions[mine]] = -1
        self._discard(shard.name, reason)

    def _discard(self, name: str, reason: str) -> None:
        self._known.add(name)  # not reread from disk in this process
        for suffix in (".json", ".npy"):
            with contextlib.suppress(FileNotFoundError):
                (self.path / f"{name}{suffix}").unlink()

    # -- writing ------------------------------------------------------------------------------------------
    def add(self, pos: int, views: np.ndarray) -> None:
        """Queue the views of a freshly decoded image; full shards are written in the background."""
        if views.shape != self.view_shape or views.dtype != np.uint8:
            return
        self._pending_pos.append(pos)
        self._pending.append(views)
        if len(self._pending) >= self.shard_images:
            self._submit()

    def _submit(self) -> None:
        if not self._pending:
            return
        positions, pixels = self._pending_pos, np.stack(self._pending)
        self._pending_pos, self._pending = [], []
        self._writes.append(self._writer.submit(self._write, positions, pixels))

    def flush(self) -> None:
        """Write what is queued and wait until every shard of this process is on disk."""
        self._submit()
        writes, self._writes = self._writes, []
        for f in writes:
            try:
                f.result()
            except OSError as exc:  # a full disk or a read-only folder costs the cache, not the run
                log.warning("input cache: could not write a shard to %s (%s)", self.path, exc)

    def _write(self, positions: list[int], pixels: np.ndarray) -> None:
        if not self.cache.reserve(pixels.nbytes, self):
            return
        name = f"shard-{uuid.uuid4().hex[:16]}"
        # No fsync: the CRC in the index catches pixels that did not reach the disk whole.
        with atomic_path(self.path / f"{name}.npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, pixels, allow_pickle=False)
        crc = zlib.crc32(pixels)
        write_json_atomic(
            self.path / f"{name}.json",
            {"format": FORMAT, "positions": positions, "shape": list(pixels.shape), "crc32": crc},
        )
        shard = _Shard(name, np.asarray(positions, np.int64), crc, tuple(pixels.shape))
        self._register(shard)

    def close(self) -> None:
        self.flush()
        self._writer.shutdown(wait=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the shared lock
            self._lock_fd = None


class InputCache:
    """The cache folder: opens entries (one per dataset listing and geometry) and keeps it under its cap.

    Args:
        root: The folder.
        max_bytes: Size cap over all entries.
    """

    def __init__(self, root: str | os.PathLike, max_bytes: int):
        self.root = Path(root)
        self.max_bytes = int(max_bytes)
        self._entries: dict[str, CacheEntry] = {}
        self._mutex = threading.Lock()
        self._full_noted = False

    def entry(self, dataset: "ImageDataset", spec: PreprocessSpec) -> CacheEntry | None:
        """The entry of ``dataset``'s listing under ``spec``'s geometry (created empty when new), or None when
        the cache folder cannot be used (the run then decodes without it)."""
        try:
            name = entry_name(dataset, spec)
            if name in self._entries:
                entry = self._entries[name]
                entry.refresh()
            else:
                entry = self._open(name, dataset, spec)
                self._entries[name] = entry
            os.utime(entry.path / "entry.json")  # last use, for eviction
            return entry
        except OSError as exc:
            log.warning("input cache %s unusable (%s); images are decoded without it", self.root, exc)
            return None

    def _open(self, name: str, dataset: "ImageDataset", spec: PreprocessSpec) -> CacheEntry:
        path = self.root / name
        view_shape = (num_views(spec), *spec.size, 3)
        for _ in range(5):
            path.mkdir(parents=True, exist_ok=True)
            fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT, 0o644)
            if fcntl is None:
                break
            fcntl.flock(fd, fcntl.LOCK_SH)
            # An evictor may have renamed the folder away between our open and our lock: retry on a new one.
            try:
                if os.stat(path / "lock").st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        else:
            raise OSError(f"could not lock {path / 'lock'}")
        if not (path / "entry.json").is_file():
            write_json_atomic(
                path / "entry.json",
                {
                    "format": FORMAT,
                    "source": dataset.source,
                    "images": len(dataset.origin.samples),
                    "listing_hash": dataset.origin.listing_hash(),
                    "geometry": geometry(spec),
                    "view_shape": list(view_shape),
                    "decoder": _decoder_versions(spec),
                },
            )
        self._remove_stale(path)
        return CacheEntry(self, path, len(dataset.origin.samples), view_shape, fd)

    @staticmethod
    def _remove_stale(path: Path) -> None:
        """Temporary and unindexed shard files left by a killed process: a temporary (``.entry.json.PID-X.tmp``,
        ``.shard-*.npy.PID-X.tmp``) as soon as the process named in it is gone, as the ``--out`` sweep does;
        anything else once it is old enough not to be in flight (another machine sharing the folder)."""

        now = time.time()
        for p in path.iterdir():
            temporary = p.name.startswith(".") and ".tmp" in p.name
            stale = temporary or (p.suffix == ".npy" and not p.with_suffix(".json").exists())
            owner = temp_file_owner(p.name) if temporary else None
            with contextlib.suppress(FileNotFoundError):
                if (owner is not None and process_gone(owner)) or (stale and now - p.stat().st_mtime > STALE_SECONDS):
                    p.unlink()

    def usage(self) -> int:
        """Bytes used by every entry."""
        if not self.root.is_dir():
            return 0
        return sum(_dir_bytes(d) for d in self.root.iterdir() if d.is_dir())

    def reserve(self, nbytes: int, entry: CacheEntry) -> bool:
        """Make room for ``nbytes`` more, evicting least recently used entries no process holds; False when
        the cap cannot be met (the entry then stops growing)."""
        with self._mutex:
            used = self.usage()
            if used + nbytes > self.max_bytes:
                used -= self._evict(used + nbytes - self.max_bytes)
            if used + nbytes <= self.max_bytes:
                return True
            if not self._full_noted:
                self._full_noted = True
                log.warning(
                    "input cache %s is full (%.1f of %.1f GB, the rest in use); images beyond it are decoded on "
                    "every pass (raise --input-cache-max-gb)",
                    self.root,
                    used / 1e9,
                    self.max_bytes / 1e9,
                )
            return False

    def _evict(self, need: int) -> int:
        mine = {e.path.name for e in self._entries.values()}
        candidates = []
        for d in self.root.iterdir():
            if d.is_dir() and not d.name.startswith(".") and d.name not in mine:
                with contextlib.suppress(FileNotFoundError):
                    marker = d / "entry.json"
                    candidates.append(((marker if marker.exists() else d).stat().st_mtime, d))
        freed = 0
        for _, d in sorted(candidates):
            if freed >= need:
                break
            size = _dir_bytes(d)
            if evict_entry(d):
                freed += size
        return freed

    def close(self) -> None:
        for e in self._entries.values():
            e.close()
        self._entries.clear()


def evict_entry(path: Path) -> bool:
    """Delete an entry folder unless a process holds it (its lock is shared-locked); True when deleted."""
    try:
        fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    except (FileNotFoundError, NotADirectoryError):
        return False
    try:
        if fcntl is None:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        trash = path.parent / f".evicted-{uuid.uuid4().hex[:12]}"
        try:
            os.rename(path, trash)
        except OSError:
            return False
    finally:
        os.close(fd)
    shutil.rmtree(trash, ignore_errors=True)
    return True


# -------------------------------------------------------------------------------- the process's default

_options = InputCacheOptions()
_default: InputCache | None = None


def configure(options: InputCacheOptions) -> None:
    """Set the cache every pass of this process uses by default (``--input-cache``, ``--no-input-cache``,
    ``--input-cache-max-gb``)."""
    global _options, _default
    if _default is not None:
        _default.close()
        _default = None
    _options = options


def current_options() -> InputCacheOptions:
    """The options every pass of this process uses (what a distributed run hands its workers)."""
    return _options


def default_root(options: InputCacheOptions | None = None) -> Path:
    options = options or _options
    return Path(options.path) if options.path is not None else cache_dir() / "inputs"


def default_input_cache() -> InputCache | None:
    """The configured cache (None when disabled); the default folder follows ``$QUANTSHIP_CACHE``."""
    global _default
    if not _options.enabled:
        return None
    root = default_root()
    if _default is None or _default.root != root:
        if _default is not None:
            _default.close()
        _default = InputCache(root, int(_options.max_gb * 1e9))
    return _default
