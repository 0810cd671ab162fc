"""Streaming per-tensor statistics: running min/max and a histogram of |x| that grows by whole bins.

Memory per tensor is the histogram (2048 bins to start, more only when larger values arrive), never the
activations: a calibration pass over any number of images keeps the same footprint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from quantship.errors import CalibrationError

DEFAULT_BINS = 2048


@dataclass
class TensorStats:
    """Statistics of one tensor over the whole calibration feed.

    The histogram covers ``[0, len(counts) * width)`` with bins of equal ``width``. The first batch with a
    non-zero value fixes ``width = max|x| / num_bins``; later batches with larger values append bins of the
    same width (as TensorRT's and pytorch-quantization's histogram calibrators do), so earlier counts never
    need re-binning.
    """

    name: str
    num_bins: int = DEFAULT_BINS
    counts: np.ndarray | None = None
    width: float = 0.0
    min: float = math.inf
    max: float = -math.inf
    amax: float = 0.0
    pending_zeros: int = 0  # |x| == 0 values seen before the histogram's range was known
    num_values: int = 0
    batches: int = field(default=0)

    def update(self, x: np.ndarray) -> None:
        """Add one batch of values.

        Raises:
            CalibrationError: The batch holds NaN or inf (named by tensor).
        """
        x = np.asarray(x)
        if x.size == 0:
            return
        if x.dtype != np.float32:
            x = x.astype(np.float32)
        lo, hi = float(x.min()), float(x.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise CalibrationError(
                f"tensor '{self.name}' holds NaN or inf values in calibration batch {self.batches + 1}"
            )
        self.batches += 1
        self.num_values += x.size
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        batch_amax = max(abs(lo), abs(hi))
        self.amax = max(self.amax, batch_amax)
        if batch_amax == 0.0:
            if self.counts is None:
                self.pending_zeros += x.size
            else:
                self.counts[0] += x.size
            return
        a = np.abs(x).ravel()
        if self.counts is None:
            self.width = batch_amax / self.num_bins
            self.counts = np.zeros(self.num_bins, dtype=np.int64)
            self.counts[0] += self.pending_zeros
            self.pending_zeros = 0
        elif batch_amax > self.upper_edge:
            n = max(len(self.counts), int(math.ceil(batch_amax / self.width)))
            self.counts = np.concatenate([self.counts, np.zeros(n - len(self.counts), np.int64)])
        n = len(self.counts)
        idx = (a * np.float32(1.0 / self.width)).astype(np.int64)
        np.minimum(idx, n - 1, out=idx)  # the largest value sits on the top edge: it belongs to the last bin
        self.counts += np.bincount(idx, minlength=n)

    @property
    def upper_edge(self) -> float:
        return 0.0 if self.counts is None else len(self.counts) * self.width

    @property
    def edges(self) -> np.ndarray:
        assert self.counts is not None
        return np.arange(len(self.counts) + 1, dtype=np.float64) * self.width

    def nbytes(self) -> int:
        return 0 if self.counts is None else self.counts.nbytes

    def to_dict(self) -> dict:
        return {
            "min": self.min,
            "max": self.max,
            "amax": self.amax,
            "bins": 0 if self.counts is None else len(self.counts),
            "values": self.num_values,
        }
