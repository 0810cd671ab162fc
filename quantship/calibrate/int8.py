"""Symmetric int8 arithmetic shared by the calibrators (``auto`` judges a layer with int8 weights) and the Q/DQ
graph rewrites in :mod:`quantship.convert.qdq`."""

from __future__ import annotations

import numpy as np

INT8_MAX = 127


def quantize_weight(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel int8: scale_c = max|w_c| / 127 (1 for an all-zero channel)."""
    moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    amax = np.abs(moved).max(axis=1)
    scale = np.where(amax > 0, amax / INT8_MAX, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.round(w / scale.reshape(shape)), -INT8_MAX, INT8_MAX).astype(np.int8)
    return q, scale
