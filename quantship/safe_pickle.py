"""Restricted unpicklers: read tensors and encoded images out of pickles without executing code.

``pickle.load`` runs whatever callables a file names. These unpicklers resolve only an explicit allow-list
of globals to inert stand-ins or pure constructors; anything else raises :class:`UnsafePickleError` before
it is touched. Two formats are read:

* PyTorch checkpoints (the legacy stream format of ``torch.save`` before 1.6, and the zip format), as a
  ``dict[str, numpy.ndarray]`` of state-dict tensors, without installing PyTorch;
* the ``val224`` ImageNet pickle of older benchmark repositories: a dict whose ``data`` holds encoded images
  (bytes or uint8 arrays) and ``target`` the labels.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from quantship.errors import ModelLoadError, UnsafePickleError

# --------------------------------------------------------------------------------------------- numpy


def _np_reconstruct(subtype: Any, shape: Any, dtype: Any, limit: int | None = None) -> np.ndarray:
    if subtype is not np.ndarray:
        raise UnsafePickleError(f"refused array subtype {subtype!r}")
    _check_array_size(shape, dtype, limit)
    return np.ndarray.__new__(np.ndarray, shape, dtype)


def _check_array_size(shape: Any, dtype: Any, limit: int | None) -> None:
    """Refuse an array bigger than the file it comes from before allocating it (its data would have to be in
    the file; a shape of 10**13 would otherwise ask for terabytes)."""
    dims = shape if isinstance(shape, (tuple, list)) else (shape,)
    try:
        nbytes = np.dtype(dtype).itemsize
        for d in dims:
            nbytes *= int(d)
    except (TypeError, ValueError):
        raise UnsafePickleError(f"refused array of shape {shape!r} and dtype {dtype!r}") from None
    if nbytes < 0 or (limit is not None and nbytes > limit):
        raise UnsafePickleError(f"refused an array of shape {shape!r} ({nbytes} bytes): larger than its file")


def _np_dtype(spec: Any, align: bool = False, copy: bool = False) -> np.dtype:
    dt = np.dtype(spec)
    if dt.kind not in "biufcSU" or dt.hasobject:
        raise UnsafePickleError(f"refused numpy dtype {dt} (only numeric, bytes and str dtypes are read)")
    return dt


def _np_scalar(dtype: np.dtype, data: bytes | None = None) -> Any:
    if dtype.hasobject:
        raise UnsafePickleError("refused object scalar")
    return np.frombuffer(data or b"", dtype=dtype, count=1)[0]


def _codecs_encode(obj: str, encoding: str = "latin1") -> bytes:
    # Python 2 pickles of byte strings, read with encoding='bytes', come through here.
    if encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"refused _codecs.encode with encoding {encoding!r}")
    return obj.encode("latin1")


_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy.core.multiarray", "scalar"): _np_scalar,
    ("numpy._core.multiarray", "scalar"): _np_scalar,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _np_dtype,
    ("_codecs", "encode"): _codecs_encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose ``find_class`` consults an allow-list and nothing else."""

    allowed: dict[tuple[str, str], Any] = {}
    source = "pickle"
    max_array_bytes: int | None = None  # an array larger than this is refused before it is allocated

    def find_class(self, module: str, name: str) -> Any:
        try:
            found = self.allowed[(module, name)]
            if found is _np_reconstruct:
                limit = self.max_array_bytes
                return lambda subtype, shape, dtype: _np_reconstruct(subtype, shape, dtype, limit)
            return found
        except KeyError:
            raise UnsafePickleError(
                f"{self.source}: refused to load '{module}.{name}': this file asks to run code that a "
                f"{self.kind} must not contain; it may be malicious or of another format"
            ) from None

    kind = "data file"

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self.source}: unexpected persistent id {pid!r}")


# ------------------------------------------------------------------------------------------- val224


class _Val224Unpickler(_RestrictedUnpickler):
    allowed = dict(_NUMPY_GLOBALS)
    kind = "val224 image pickle"


def load_val224_pickle(path: str | Path) -> dict[str, Any]:
    """Read a ``val224``-style pickle (``{'data': [encoded images], 'target': [labels]}``) safely.

    Raises:
        UnsafePickleError: The file names a global outside the numpy/bytes allow-list.
        pickle.UnpicklingError, EOFError, ValueError: The file is truncated or not a pickle.
    """
    path = Path(path)
    with open(path, "rb") as f:
        u = _Val224Unpickler(f, encoding="bytes")
        u.source = str(path)
        u.max_array_bytes = os.fstat(f.fileno()).st_size
        obj = u.load()
    if isinstance(obj, dict):
        obj = {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}
    return obj


# -------------------------------------------------------------------------------------------- torch

_TORCH_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


@dataclass(frozen=True)
class _StorageType:
    name: str

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(_TORCH_STORAGE_DTYPES[self.name])


class _Storage:
    """A storage whose bytes arrive after the object pickle (legacy) or from the zip archive."""

    def __init__(self, stype: _StorageType, numel: int):
        self.dtype = stype.dtype
        self.numel = int(numel)
        self.array: np.ndarray | None = None


@dataclass
class _TensorRef:
    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def materialize(self) -> np.ndarray:
        base = self.storage.array
        if base is None:
            raise ModelLoadError("checkpoint is truncated: a tensor's storage was never written")
        n = 1
        for s in self.size:
            n *= s
        if n == 0:
            return np.zeros(self.size, dtype=base.dtype)
        last = self.offset + sum((s - 1) * st for s, st in zip(self.size, self.stride))
        if self.offset < 0 or last >= base.size:
            raise ModelLoadError("checkpoint is corrupt: a tensor reaches past the end of its storage")
        view = np.lib.stride_tricks.as_strided(
            base[self.offset :],
            shape=self.size,
            strides=tuple(st * base.itemsize for st in self.stride),
            writeable=False,
        )
        return np.array(view, copy=True)


def _rebuild_tensor(storage: _Storage, offset: int, size: Any, stride: Any, *_: Any) -> _TensorRef:
    if not isinstance(storage, _Storage):
        raise UnsafePickleError("tensor rebuilt from something that is not a storage")
    return _TensorRef(storage, int(offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


def _rebuild_parameter(data: Any, requires_grad: Any = None, backward_hooks: Any = None, *_: Any) -> Any:
    return data


class _OrderedDict(dict):
    """Stand-in for ``collections.OrderedDict``; keeps the ``_metadata`` state torch attaches, inertly."""

    def __setstate__(self, state: Any) -> None:
        self.pickled_state = state


def _ordered_dict(*args: Any) -> dict:
    return _OrderedDict(*args)


_TORCH_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in _TORCH_STORAGE_DTYPES},
}


class _TorchUnpickler(_RestrictedUnpickler):
    allowed = _TORCH_GLOBALS
    kind = "weights checkpoint"

    def __init__(self, f: BinaryIO, **kw: Any):
        super().__init__(f, **kw)
        self.storages: dict[str, _Storage] = {}

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and pid and pid[0] in ("storage", b"storage")):
            raise UnsafePickleError(f"{self.source}: refused persistent id {pid!r}")
        stype, key, _location, numel = pid[1], pid[2], pid[3], pid[4]
        if not isinstance(stype, _StorageType):
            raise UnsafePickleError(f"{self.source}: unknown storage type {stype!r}")
        key = key.decode() if isinstance(key, bytes) else str(key)
        if key not in self.storages:
            self.storages[key] = _Storage(stype, numel)
        return self.storages[key]


class _PlainUnpickler(_RestrictedUnpickler):
    """For the small header pickles of the legacy format: plain ints, strings and dicts only."""

    allowed = {}
    kind = "checkpoint header"


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _materialize(obj: Any) -> Any:
    if isinstance(obj, _TensorRef):
        return obj.materialize()
    if isinstance(obj, dict):
        return {(k.decode() if isinstance(k, bytes) else k): _materialize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialize(v) for v in obj)
    return obj


def _load_legacy(f: BinaryIO, source: str) -> Any:
    def header() -> Any:
        u = _PlainUnpickler(f)
        u.source = source
        return u.load()

    if header() != _LEGACY_MAGIC:
        raise ModelLoadError(f"{source}: not a PyTorch checkpoint (wrong magic number)")
    header()  # protocol version
    header()  # sys info (endianness, type sizes)
    u = _TorchUnpickler(f)
    u.source = source
    result = u.load()
    keys = header()
    for key in keys:
        key = key.decode() if isinstance(key, bytes) else str(key)
        storage = u.storages.get(key)
        if storage is None:
            raise ModelLoadError(f"{source}: checkpoint lists storage {key!r} that no tensor uses")
        raw = f.read(8)
        if len(raw) != 8:
            raise ModelLoadError(f"{source}: checkpoint is truncated (storage {key!r} missing)")
        (numel,) = struct.unpack("<q", raw)
        nbytes = numel * storage.dtype.itemsize
        if nbytes < 0 or nbytes > os.fstat(f.fileno()).st_size - f.tell():
            raise ModelLoadError(f"{source}: checkpoint is truncated or corrupt (storage {key!r} of {numel} items)")
        data = f.read(nbytes)
        if len(data) != nbytes:
            raise ModelLoadError(f"{source}: checkpoint is truncated inside storage {key!r}")
        storage.array = np.frombuffer(data, dtype=storage.dtype.newbyteorder("<"))
    return _materialize(result)


def _load_zip(path: Path) -> Any:
    source = str(path)
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if pkl is None:
            raise ModelLoadError(f"{source}: zip file without data.pkl: not a PyTorch checkpoint")
        prefix = pkl[: -len("data.pkl")]
        u = _TorchUnpickler(io.BytesIO(zf.read(pkl)))
        u.source = source
        result = u.load()
        for key, storage in u.storages.items():
            try:
                data = zf.read(f"{prefix}data/{key}")
            except KeyError:
                raise ModelLoadError(f"{source}: storage {key!r} missing from the archive") from None
            storage.array = np.frombuffer(data, dtype=storage.dtype.newbyteorder("<"))
    return _materialize(result)


def load_torch_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Read a PyTorch checkpoint's tensors as numpy arrays, executing nothing from the file.

    Args:
        path: A ``.pth``/``.pt`` file written by ``torch.save`` (legacy or zip format) holding a state dict
            (optionally nested under ``state_dict`` or ``model``).

    Returns:
        Mapping of parameter names to arrays.

    Raises:
        UnsafePickleError: The file references anything but tensors, storages and dicts.
        ModelLoadError: The file is missing, truncated, or not a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"checkpoint not found: {path}")
    try:
        if zipfile.is_zipfile(path):
            obj = _load_zip(path)
        else:
            with open(path, "rb") as f:
                obj = _load_legacy(f, str(path))
    except (UnsafePickleError, ModelLoadError):
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, struct.error) as exc:
        raise ModelLoadError(f"{path}: unreadable or truncated checkpoint ({exc})") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, np.ndarray) for v in obj.values()):
        raise ModelLoadError(f"{path}: checkpoint does not hold a state dict of tensors")
    return obj
