"""The preprocessed-input cache: what it stores, when it is used, and when it must not be (changed files,
changed geometry, corrupt or partial shards), its size cap, and the normalisation applied to its pixels."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from conftest import encode, synthetic_image, write_synset_dataset
from quantship.config import ChannelOrder, PreprocessSpec
from quantship.data import datasets
from quantship.data.cache import InputCache, evict_entry
from quantship.data.datasets import iter_batches, load_dataset
from quantship.data.preprocess import InputEncoding, decode_image, normalize, preprocess_image
from quantship.runtime.base import TensorMeta, quantize

SPEC = PreprocessSpec(size=(24, 24), crop_pct=0.875)


@pytest.fixture
def data(tmp_path) -> Path:
    return write_synset_dataset(tmp_path / "data", 4, seed=3)  # 12 JPEGs


@pytest.fixture
def decodes(monkeypatch) -> list[str]:
    """Records every image the loader decodes (the real decoder still runs)."""
    seen: list[str] = []
    real = datasets.image_views

    def counting(data, spec, source="image"):
        seen.append(source)
        return real(data, spec, source)

    monkeypatch.setattr(datasets, "image_views", counting)
    return seen


def inputs(ds, spec, cache, batch=5) -> np.ndarray:
    return np.concatenate([b.inputs for b in iter_batches(ds, spec, batch, 2, cache=cache)])


def reference(ds, spec) -> np.ndarray:
    return np.stack([preprocess_image(decode_image(s.read()), spec) for s in ds.samples])


def test_filled_on_first_pass_then_read_without_decoding(tmp_path, data, decodes):
    cache = InputCache(tmp_path / "cache", 10**9)
    ds = load_dataset(f"imagenet:{data}")
    spec = SPEC.with_overrides(crops="10crop", channel_order="bgr", layout="nchw")
    first = inputs(ds, spec, cache)
    assert len(decodes) == len(ds)
    np.testing.assert_array_equal(first, reference(ds, spec))  # same bits as preprocessing without a cache
    (entry,) = cache._entries.values()
    assert entry.cached == len(ds)
    decodes.clear()
    # A subset (a sign-off chunk, a calibration draw) of a freshly loaded listing: same entry, nothing decoded.
    again = load_dataset(f"imagenet:{data}")
    sub = again.subset([7, 2, 11])
    np.testing.assert_array_equal(inputs(sub, spec, InputCache(tmp_path / "cache", 10**9)), first[[7, 2, 11]])
    assert decodes == []
    # Another normalisation, same geometry: served by the same entry.
    other = spec.with_overrides(mode="caffe", layout="nhwc")
    np.testing.assert_array_equal(inputs(again, other, cache), reference(again, other))
    assert decodes == []
    assert len(list((tmp_path / "cache").iterdir())) == 1
    # Consecutive cached images are handed over as the shard's mapped rows, without a copy.
    assert isinstance(next(iter_batches(again, spec, 4, 2, cache=cache)).pixels, np.memmap)


def test_changed_file_or_geometry_is_not_served_from_the_cache(tmp_path, data, decodes):
    root = tmp_path / "cache"
    ds = load_dataset(f"imagenet:{data}")
    inputs(ds, SPEC, InputCache(root, 10**9))
    decodes.clear()
    # Another geometry: a new entry, every image decoded again.
    bigger = SPEC.with_overrides(size=(28, 28))
    np.testing.assert_array_equal(inputs(ds, bigger, InputCache(root, 10**9)), reference(ds, bigger))
    assert len(decodes) == len(ds)
    decodes.clear()
    # One file rewritten with another picture: the listing (size, mtime) changes, so no stale pixels.
    changed = ds.samples[4].path
    changed.write_bytes(encode(synthetic_image(2, np.random.default_rng(99))))
    os.utime(changed, ns=(changed.stat().st_mtime_ns + 10**9,) * 2)
    fresh = load_dataset(f"imagenet:{data}")
    np.testing.assert_array_equal(inputs(fresh, SPEC, InputCache(root, 10**9)), reference(fresh, SPEC))
    assert len(decodes) == len(ds)
    assert len(list(root.iterdir())) == 3


@pytest.mark.parametrize("damage", ["flip", "truncate", "zero_bytes", "no_index"])
def test_corrupt_or_partial_shard_is_discarded_and_rebuilt(tmp_path, data, decodes, damage):
    root = tmp_path / "cache"
    ds = load_dataset(f"imagenet:{data}")
    good = inputs(ds, SPEC, InputCache(root, 10**9))
    (entry_dir,) = root.iterdir()
    (shard,) = entry_dir.glob("shard-*.npy")
    blob = bytearray(shard.read_bytes())
    if damage == "flip":
        blob[-100] ^= 0xFF  # a pixel: only the CRC can tell
        shard.write_bytes(bytes(blob))
    elif damage == "truncate":
        shard.write_bytes(bytes(blob[: len(blob) // 2]))
    elif damage == "zero_bytes":  # what a full disk or a crash leaves (numpy: EOFError, not ValueError)
        shard.write_bytes(b"")
    else:  # killed between writing the pixels and their index
        shard.with_suffix(".json").unlink()
    decodes.clear()
    np.testing.assert_array_equal(inputs(ds, SPEC, InputCache(root, 10**9)), good)
    assert len(decodes) == len(ds)
    if damage != "no_index":
        assert not shard.exists()
    # Rebuilt: the next pass reads everything from the new shard.
    decodes.clear()
    np.testing.assert_array_equal(inputs(ds, SPEC, InputCache(root, 10**9)), good)
    assert decodes == []


def test_size_cap_evicts_least_recently_used_entries_not_in_use(tmp_path, data):
    root = tmp_path / "cache"
    ds = load_dataset(f"imagenet:{data}")
    held = InputCache(root, 10**9)  # another run: holds its entry while it lives
    inputs(ds, SPEC, held)
    idle = InputCache(root, 10**9)
    inputs(ds, SPEC.with_overrides(size=(20, 20)), idle)
    idle.close()  # that run ended: its entry may go
    one = max(InputCache(root, 0).usage() // 2, 1)
    small = InputCache(root, int(one * 1.5))  # room for one entry only
    inputs(ds, SPEC.with_overrides(size=(26, 26)), small)
    names = {p.name for p in root.iterdir()}
    assert len(names) == 2  # the idle entry was evicted, the held one kept, and the new one stopped growing
    (held_name,) = [e.path.name for e in held._entries.values()]
    assert held_name in names
    (new_entry,) = small._entries.values()
    assert new_entry.cached == 0 and not list(new_entry.path.glob("shard-*"))
    assert not evict_entry(root / held_name)  # in use: refused
    held.close()
    assert evict_entry(root / held_name)


def test_int8_input_folded_into_one_lookup_equals_normalise_then_quantize():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (3, 2, 8, 8, 3), dtype=np.uint8)
    pixels[0, 0, 0, :, 0] = np.arange(8) * 36  # the extremes 0 and 252, and steps between
    seen = set()
    for mode in ("tf", "torch", "caffe", "raw"):
        for layout in ("nhwc", "nchw"):
            spec = PreprocessSpec.from_mode(mode, size=8, layout=layout)
            floats = normalize(pixels, spec, ChannelOrder.RGB)
            quantized = [(np.int8, 2 / 255, -1), (np.uint8, 0.0171, 117), (np.int8, 0.93, 3)]
            quantized += [(np.uint8, 1.0, 0), (np.int8, 1.0, -128)]  # raw: pixels as they are, or sign-flipped
            for dtype, scale, zp in quantized:
                meta = TensorMeta("x", (None, 8, 8, 3), np.dtype(dtype), scale, zp)
                enc = InputEncoding.of(spec, dtype, scale, zp)
                seen.add(enc._lookup[0])
                np.testing.assert_array_equal(enc(pixels), quantize(floats, meta))
            np.testing.assert_array_equal(InputEncoding.of(spec)(pixels), floats)
    assert seen == {"identity", "flip", "shared", "per-channel"}


def test_temporary_files_of_a_dead_process_are_removed_at_once(tmp_path, data):
    """A fill killed while writing leaves ``.entry.json.PID-X.tmp`` / ``.shard-*.npy.PID-X.tmp``: gone at the next
    open when process PID is gone (not an hour later); a live process's temporary stays."""
    root = tmp_path / "cache"
    ds = load_dataset(f"imagenet:{data}")
    inputs(ds, SPEC, InputCache(root, 10**9))
    (entry_dir,) = root.iterdir()
    dead = [entry_dir / ".entry.json.999999999-ab12.tmp", entry_dir / ".shard-0123.npy.999999999-cd34.tmp"]
    live = entry_dir / f".entry.json.{os.getppid()}-ef56.tmp"
    for p in (*dead, live):
        p.write_bytes(b"half")
    inputs(ds, SPEC, InputCache(root, 10**9))
    assert not any(p.exists() for p in dead) and live.exists()
