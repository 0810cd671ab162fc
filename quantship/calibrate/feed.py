"""The calibration feed: any iterable of ``{input name: array}`` batches (or bare arrays), checked on the way.

The same feed drives TFLite's representative dataset, the ONNX statistics collector and TensorRT's
calibrators.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np

from quantship.errors import CalibrationError


def checked_batches(
    feed: Iterable[Mapping[str, np.ndarray] | np.ndarray],
    inputs: Sequence[tuple[str, tuple[int | None, ...]]],
) -> Iterator[dict[str, np.ndarray]]:
    """Yield float32 batches keyed by input name, verifying names, shapes, dtype and finiteness.

    Args:
        feed: The batches.
        inputs: (name, shape) of each model input; ``None`` dimensions are free (the batch).

    Raises:
        CalibrationError: Empty feed, unknown/missing input, wrong rank or shape, non-numeric dtype, NaN/inf.
    """
    names = [n for n, _ in inputs]
    count = 0
    for k, batch in enumerate(feed, 1):
        if isinstance(batch, np.ndarray):
            if len(inputs) != 1:
                raise CalibrationError(
                    f"calibration batch {k}: the model has {len(inputs)} inputs; give a dict by name"
                )
            batch = {names[0]: batch}
        if set(batch) != set(names):
            raise CalibrationError(f"calibration batch {k}: inputs {sorted(batch)} do not match the model's {names}")
        out = {}
        for name, shape in inputs:
            x = np.asarray(batch[name])
            if x.dtype.kind not in "fiu":
                raise CalibrationError(
                    f"calibration batch {k}: input '{name}' has dtype {x.dtype}; a numeric array is needed"
                )
            if x.ndim != len(shape) or any(d is not None and d != s for d, s in zip(shape[1:], x.shape[1:])):
                want = "(" + ", ".join("N" if d is None else str(d) for d in shape) + ")"
                raise CalibrationError(
                    f"calibration batch {k}: input '{name}' has shape {tuple(x.shape)}, the model takes {want}"
                )
            x = x.astype(np.float32, copy=False)
            if not np.isfinite(x).all():
                raise CalibrationError(f"calibration batch {k}: input '{name}' holds NaN or inf values")
            out[name] = x
        count += 1
        yield out
    if count == 0:
        raise CalibrationError("the calibration feed is empty: no batch was produced")


class FixedBatches:
    """The checked feed re-chunked into batches of exactly ``batch_size`` (TensorRT's calibrator has one
    batch size); the incomplete remainder is dropped and counted.

    Args:
        feed: The batches (any size).
        batch_size: Size of every batch yielded.
        inputs: (name, shape) of each model input, as for :func:`checked_batches`.
    """

    def __init__(
        self,
        feed: Iterable[Mapping[str, np.ndarray] | np.ndarray],
        batch_size: int,
        inputs: Sequence[tuple[str, tuple[int | None, ...]]],
    ):
        if batch_size <= 0:
            raise CalibrationError(f"calibration batch size must be positive, got {batch_size}")
        self.feed, self.batch_size, self.inputs = feed, batch_size, list(inputs)
        self.images = 0
        self.dropped = 0

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        names = [n for n, _ in self.inputs]
        pending: dict[str, list[np.ndarray]] = {n: [] for n in names}
        have = 0
        for batch in checked_batches(self.feed, self.inputs):
            for name in names:
                pending[name].append(batch[name])
            have += next(iter(batch.values())).shape[0]
            while have >= self.batch_size:
                merged = {name: np.concatenate(parts) for name, parts in pending.items()}
                out = {name: np.ascontiguousarray(a[: self.batch_size]) for name, a in merged.items()}
                pending = {name: [a[self.batch_size :]] for name, a in merged.items()}
                have -= self.batch_size
                self.images += self.batch_size
                yield out
        self.dropped = have
