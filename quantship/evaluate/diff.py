"""Layer-by-layer comparison of two runs of one model: SQNR, cosine similarity and max |diff| (in quantization
steps where the compared tensor is quantized) per layer, and the first layer where SQNR drops against its input.

Statistics accumulate over batches, so any number of images is compared with one batch of tensors in memory.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from quantship.config import CropMode
from quantship.data.datasets import iter_batches
from quantship.errors import DataError
from quantship.progress import track

# A layer whose inputs are identical in both runs (the model input, a float op on float inputs) is compared with
# this many dB: about what rounding a well-ranged tensor to int8 gives (6 dB per bit, less the crest factor). So
# the first quantized layer is not flagged for ordinary rounding noise, and values above it (float vs float,
# 60-140 dB of float32 rounding) never make a drop.
SQNR_CEILING_DB = 40.0
DEFAULT_DROP_DB = 10.0


@dataclass
class TensorDiff:
    """Running sums over batches for one layer's tensor in the reference and in the target.

    Attributes:
        step: The target tensor's quantization step (None for a float tensor).
    """

    step: float | None = None
    signal: float = 0.0  # sum of reference^2
    noise: float = 0.0  # sum of (reference - target)^2
    dot: float = 0.0
    target_energy: float = 0.0
    max_abs: float = 0.0
    values: int = 0
    shape: tuple[int, ...] = ()

    def update(self, reference: np.ndarray, target: np.ndarray) -> None:
        r = np.asarray(reference, np.float64).ravel()
        t = np.asarray(target, np.float64).ravel()
        d = r - t
        self.signal += float(r @ r)
        self.noise += float(d @ d)
        self.dot += float(r @ t)
        self.target_energy += float(t @ t)
        self.max_abs = max(self.max_abs, float(np.abs(d).max()) if d.size else 0.0)
        self.values += r.size
        self.shape = tuple(np.shape(reference)[1:])

    @property
    def sqnr_db(self) -> float:
        if self.noise == 0:
            return math.inf
        return 10.0 * math.log10(self.signal / self.noise) if self.signal > 0 else -math.inf

    @property
    def cosine(self) -> float:
        norm = math.sqrt(self.signal * self.target_energy)
        return self.dot / norm if norm > 0 else (1.0 if self.signal == self.target_energy else 0.0)

    @property
    def max_diff_steps(self) -> float | None:
        return self.max_abs / self.step if self.step else None


@dataclass
class LayerComparison:
    """One target against the reference, layer by layer in graph order."""

    reference: str
    target: str
    layers: dict[str, TensorDiff] = field(default_factory=dict)
    tensors: dict[str, str] = field(default_factory=dict)  # layer -> the target's tensor name
    shape_mismatch: dict[str, str] = field(default_factory=dict)

    def update(self, layer: str, reference: np.ndarray, target: np.ndarray, step: float | None) -> None:
        if np.shape(reference) != np.shape(target):
            self.shape_mismatch[layer] = f"{np.shape(reference)} vs {np.shape(target)}"
            return
        self.layers.setdefault(layer, TensorDiff(step)).update(reference, target)


def _capped(db: float, ceiling: float) -> float:
    return min(db, ceiling) if not math.isnan(db) else -math.inf


def layer_rows(
    comparison: LayerComparison,
    order: Sequence[str],
    inputs: dict[str, Sequence[str]],
    types: dict[str, str] | None = None,
    drop_db: float = DEFAULT_DROP_DB,
    ceiling_db: float = SQNR_CEILING_DB,
) -> list[dict[str, Any]]:
    """Rows in graph order for the compared layers.

    A layer *drops* when its SQNR is more than ``drop_db`` below its input's (the worst of its nearest compared
    ancestors; SQNRs are capped at ``ceiling_db``, and an input identical in both runs counts as the ceiling).
    A drop that every layer reading it undoes (back within ``drop_db`` of the dropping layer's input: a ReLU that
    clips away a difference in negative values) is marked ``masked``; ``first_drop`` marks the first drop that is
    not: where the two runs part ways.
    """
    compared = comparison.layers

    def ancestors(layer: str) -> set[str]:
        """The nearest compared layers upstream of ``layer``."""
        found: set[str] = set()
        stack, seen = list(inputs.get(layer, ())), set()
        while stack:
            parent = stack.pop()
            if parent in seen:
                continue
            seen.add(parent)
            if parent in compared:
                found.add(parent)
            else:
                stack += list(inputs.get(parent, ()))
        return found

    feeds = {layer: ancestors(layer) for layer in order if layer in compared}
    readers: dict[str, list[str]] = {}
    for layer, parents in feeds.items():
        for parent in parents:
            readers.setdefault(parent, []).append(layer)

    def capped(layer: str) -> float:
        return _capped(compared[layer].sqnr_db, ceiling_db)

    rows: list[dict[str, Any]] = []
    flagged = False
    for index, layer in enumerate(order):
        if layer not in compared:
            continue
        d = compared[layer]
        before = min((compared[p].sqnr_db for p in feeds[layer]), default=math.inf)
        drop = _capped(before, ceiling_db) - capped(layer)
        dropped = drop > drop_db
        masked = (
            dropped
            and bool(readers.get(layer))
            and all(capped(r) >= _capped(before, ceiling_db) - drop_db for r in readers[layer])
        )
        first = dropped and not masked and not flagged
        flagged |= first
        rows.append(
            {
                "kind": "layer",
                "reference": comparison.reference,
                "target": comparison.target,
                "index": index,
                "layer": layer,
                "layer_type": (types or {}).get(layer, ""),
                "tensor": comparison.tensors.get(layer, ""),
                "shape": list(d.shape),
                "sqnr_db": _finite(d.sqnr_db),
                "input_sqnr_db": _finite(before),
                "drop_db": _finite(drop),
                "cosine": d.cosine,
                "max_abs_diff": d.max_abs,
                "step": d.step,
                "max_diff_steps": d.max_diff_steps,
                "masked": masked,
                "first_drop": first,
            }
        )
    return rows


def _finite(x: float) -> float | str:
    """JSON has no infinity: an exact match is written as "inf"."""
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")


def as_float(x: Any) -> float:
    """A stored SQNR back as a number ("inf" included)."""
    return float(x) if x is not None else math.nan


def first_drop(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    return next((r for r in rows if r.get("first_drop")), None)


DIFF_COLUMNS = (
    ("index", "#", "{}"),
    ("layer", "Keras layer", "{}"),
    ("layer_type", "type", "{}"),
    ("sqnr_db", "SQNR dB", "{:.1f}"),
    ("drop_db", "drop dB", "{:+.1f}"),
    ("cosine", "cosine", "{:.5f}"),
    ("max_abs_diff", "max |diff|", "{:.4g}"),
    ("max_diff_steps", "in steps", "{:.1f}"),
    ("mark", "", "{}"),
)


def display_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with the fields the tables show (a mark on the first drop, SQNR printed as 'inf' when exact)."""
    out = []
    for r in rows:
        d = dict(r)
        d["mark"] = (
            "<-- first drop" if r.get("first_drop") else "(drop undone by the next layer)" if r.get("masked") else ""
        )
        for k in ("sqnr_db", "drop_db"):
            if isinstance(d.get(k), str):
                d[k] = as_float(d[k])
        out.append(d)
    return out


def diff_images(evalset: Any, preprocess: Any, batch_size: int, workers: int, limit: int | None = None) -> np.ndarray:
    """The evaluation images as one array, centre-cropped with ``preprocess`` (the first ``limit`` of them): the
    same input for every run a diff compares."""
    if limit is not None and limit < len(evalset):
        evalset = evalset.subset(range(limit))
    spec = dataclasses.replace(preprocess, crops=CropMode.CENTER)
    batches = [b.inputs[:, 0] for b in iter_batches(evalset, spec, batch_size, workers)]
    if not batches:
        raise DataError(f"no readable image among the {len(evalset)} evaluation images")
    return np.concatenate(batches).astype(np.float32)


def compare_targets(
    probes: Sequence[Any], x: np.ndarray, batch_size: int, progress: Callable = track
) -> list[LayerComparison]:
    """Every probe's tensors against the first's, accumulated batch by batch (one batch of tensors in memory).

    A probe (:class:`quantship.targets.base.LayerProbe`) has a ``name``, ``run(x) -> {layer: (value, step)}``
    and ``tensors`` (layer -> its tensor name).
    """
    reference = probes[0]
    comparisons = [LayerComparison(reference.name, p.name) for p in probes[1:]]
    starts = list(range(0, len(x), batch_size))
    for i in progress(starts, total=len(starts), desc="diff"):
        xb = x[i : i + batch_size]
        ref = reference.run(xb)
        for probe, comp in zip(probes[1:], comparisons):
            got = probe.run(xb)
            for layer, (value, step) in got.items():
                if layer in ref:
                    comp.update(layer, ref[layer][0], value, step)
    for probe, comp in zip(probes[1:], comparisons):
        comp.tensors = dict(probe.tensors)
    return comparisons
