"""Why a target failed, in one line, from the layer-by-layer comparison with fp32 (:mod:`quantship.evaluate.diff`).

The line names the first tensor where the target parts from fp32 and by how much (its SQNR against its input's,
the largest difference in quantization steps), and, on a photo it got wrong, what the output's quantization did:
several top classes rounded into one int8 value, or fp32's margin between its top two classes smaller than one
quantization step.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np

from quantship.evaluate.diff import as_float, first_drop

PARTED_DB = 20.0  # a tensor this far from fp32 (SQNR) has parted from it, whatever its input's SQNR


def _worst(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The first drop, or failing that the compared tensor with the lowest SQNR."""
    drop = first_drop(rows)
    if drop is not None:
        return drop
    finite = [r for r in rows if not math.isnan(as_float(r["sqnr_db"]))]
    return min(finite, key=lambda r: as_float(r["sqnr_db"]), default=None)


def output_effect(
    reference: np.ndarray, target: np.ndarray, step: float | None, name: Callable[[int], str] = str
) -> str:
    """What the output's quantization did to one image: ``reference`` and ``target`` are its probability (or
    score) vectors, ``step`` the quantization step of the target's output tensor (None: float)."""
    ref_top = np.argsort(-reference, kind="stable")
    top = int(np.argmax(target))
    fp = f"fp32 {name(int(ref_top[0]))} {reference[ref_top[0]]:.2f}"
    if step:
        tied = np.flatnonzero(np.abs(target - target[top]) < step / 2)
        gap = (reference[ref_top[0]] - reference[ref_top[1]]) / step if reference.size > 1 else math.inf
        if len(tied) > 1:
            return (
                f"its top {len(tied)} classes fall into one int8 value ({target[top]:.2f}, step {step:.4g}) where "
                f"{fp} leads by {gap:.2f} steps"
            )
        if gap < 1:
            return f"{fp} leads its runner-up by {gap:.2f} quantization steps ({step:.4g}): int8 cannot keep the order"
    return f"{fp}, target {name(top)} {target[top]:.2f}"


def failure_line(
    target: str,
    rows: Sequence[dict[str, Any]],
    reference: np.ndarray | None = None,
    outputs: np.ndarray | None = None,
    image: int | None = None,
    image_name: str = "",
    name: Callable[[int], str] = str,
) -> str:
    """One line: where ``target`` parts from fp32 (``rows``: its :func:`~quantship.evaluate.diff.layer_rows`)
    and, given the outputs and an image it got wrong, what its output quantization did there."""
    worst = _worst(rows)
    if worst is None:
        where = "no tensor could be compared with fp32"
    else:
        sqnr = as_float(worst["sqnr_db"])
        before = as_float(worst.get("input_sqnr_db"))
        steps = worst.get("max_diff_steps")
        where = f"parts from fp32 at {worst['layer']}"
        if worst.get("layer_type"):
            where += f" ({worst['layer_type']})"
        where += (
            f": SQNR {before:.0f} -> {sqnr:.0f} dB"
            if math.isfinite(before) and before < 1e3
            else f": SQNR {sqnr:.0f} dB"
        )
        if steps is not None:
            where += f", up to {float(steps):.1f} quantization steps off"
        low = next((r for r in rows if as_float(r["sqnr_db"]) < PARTED_DB), None)
        if low is not None and low is not worst:
            where += f" (first below {PARTED_DB:g} dB: {low['layer']}, {as_float(low['sqnr_db']):.0f} dB)"
    line = f"{target} {where}"
    if reference is not None and outputs is not None and image is not None and rows:
        last = rows[-1]
        line += f"; on {image_name or image}: " + output_effect(
            reference[image], outputs[image], last.get("step"), name
        )
    return line


def instead_clause(passing: Sequence[str] = (), fallback: str | None = None) -> str:
    """What passes instead of a failing target: the fallback's file or float set when one was computed, else the
    targets that passed in the same run, else that nothing did."""
    if fallback:
        return f"passes instead: {fallback}"
    if passing:
        return "passes instead (same run): " + ", ".join(passing)
    return "nothing else in this run passes"
