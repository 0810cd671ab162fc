"""Gate verdicts: a target against its reference on one metric, with an interval over the images.

* A metric that is a mean of per-image 0/1 values (top-1, top-5) gets an exact interval on the paired
  comparison (:mod:`quantship.evaluate.intervals`): it never collapses to a point when no pair disagrees.
* A metric that is not a mean over images (mAP) has no exact interval: it gets a paired percentile bootstrap
  over the images (an image drawn twice counts twice, with its own ground truth), labelled approximate.

Each gate says how it decides (:attr:`quantship.config.Gate.decision`): ``point`` on the point value over the
whole set (as MLPerf judges), ``interval`` on the whole interval (PASS / FAIL / INCONCLUSIVE). A gate over fewer
than ``min_images`` images is INCONCLUSIVE whatever the rule.

* Agreement with the reference (its own is 1.0 by definition) and a labelled accuracy under a ``min`` gate are
  means of per-image 0/1 values against a fixed value: an exact Clopper-Pearson interval.
* Distances to the reference (``mean_l1``, ``mean_kl``; ``max`` gates) are means of continuous per-image values:
  a percentile bootstrap of the mean, labelled approximate.

Underpowered: a ``point`` PASS whose interval does not clear the threshold keeps PASS and gains
``underpowered: true`` and ``images_to_settle``; the sign-off headline says so and ``--strict`` fails on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from quantship.config import Gate
from quantship.evaluate.intervals import (
    FAIL,
    INCONCLUSIVE,
    PASS,
    clopper_pearson,
    decide,
    paired_verdict,
    smallest_settling_size,
)
from quantship.evaluate.tasks import PairedSample

MAX_RESAMPLED_METRICS = 200  # resampling a metric that is not a mean (mAP) recomputes it: cap the count


def bootstrap_gate_values(gate: Gate, paired: PairedSample, samples: int, seed: int = 0) -> np.ndarray:
    """The gated quantity (ratio or difference in points) on paired bootstrap resamples of the images."""
    rng = np.random.default_rng(seed)
    n = paired.images
    idx = [rng.integers(0, n, n) for _ in range(min(samples, MAX_RESAMPLED_METRICS))]
    pairs = np.array([paired.resample(i) for i in idx], dtype=np.float64).reshape(-1, 2)
    tb, rb = pairs[:, 0], pairs[:, 1]
    if gate.absolute:  # min / max: the target's own value
        return tb
    if gate.relative is not None:
        return np.where(rb > 0, tb / np.where(rb > 0, rb, 1.0), np.nan)
    return 100.0 * (tb - rb)


def _bootstrap_images_to_settle(value: float, lo: float, hi: float, threshold: float, n: int) -> int | None:
    """Images that would settle an INCONCLUSIVE bootstrap verdict at the observed value: the interval's
    half-width shrinks as 1 / sqrt(images), so N = n * (half-width / |value - threshold|)^2."""
    gap = abs(value - threshold)
    if not (math.isfinite(value) and math.isfinite(lo) and math.isfinite(hi)) or gap == 0:
        return None
    return max(n, math.ceil(n * ((hi - lo) / 2.0 / gap) ** 2))


def gate_decide(gate: Gate, value: float, lo: float, hi: float, rule: str) -> str:
    """:func:`decide` for any gate: a ``max`` gate (lower is better) is judged on the negated quantity."""
    if gate.higher_is_better:
        return decide(value, lo, hi, gate.threshold, rule)
    return decide(-value, -hi, -lo, -gate.threshold, rule)


def _gated(gate: Gate, lo: float, hi: float, reference: float) -> tuple[float, float]:
    """An interval of the target's value in the gate's units, the reference's value being fixed: the ratio for
    a relative gate, the difference in points for a drop gate, the value itself for min / max."""
    if gate.absolute:
        return lo, hi
    if gate.relative is not None:
        return (lo / reference, hi / reference) if reference > 0 else (float("nan"), float("nan"))
    return 100.0 * (lo - reference), 100.0 * (hi - reference)


def _proportion_interval(
    gate: Gate, values: np.ndarray, reference: float, confidence: float
) -> tuple[float, float, int | None]:
    """Exact (Clopper-Pearson) interval of a per-image 0/1 mean whose reference value is fixed (agreement with
    the reference, or a labelled accuracy under a min gate), in the gate's units, and the images that would
    settle it at the observed rate (None when already settled or never)."""
    n, x = len(values), float(np.sum(values))
    lo, hi = _gated(gate, *clopper_pearson(x, n, confidence), reference)
    value = gate.value(x / n if n else float("nan"), reference)
    if not n or gate_decide(gate, value, lo, hi, "interval") != INCONCLUSIVE:
        return lo, hi, None
    if not math.isfinite(value) or value == gate.threshold:
        return lo, hi, None

    def settled(size: float) -> bool:
        a, b = _gated(gate, *clopper_pearson(x * size / n, size, confidence), reference)
        return gate_decide(gate, value, a, b, "interval") != INCONCLUSIVE

    return lo, hi, smallest_settling_size(n, settled)


def _bootstrap_mean(values: np.ndarray, samples: int, confidence: float, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of a per-image mean (vectorised: the mean is cheap to resample)."""
    rng = np.random.default_rng(seed)
    n = len(values)
    if not n:
        return float("nan"), float("nan")
    means = np.empty(samples)
    for i in range(0, samples, 256):  # blocks keep the index matrix small at large n
        k = min(256, samples - i)
        means[i : i + k] = values[rng.integers(0, n, (k, n))].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1.0 - alpha))


def judge_target(
    gates: Sequence[Gate],
    task: Any,
    model: str,
    target: str,
    reference: str,
    rows: tuple[dict[str, Any] | None, dict[str, Any] | None],
    arrays: Callable[[], tuple[dict[str, Any], dict[str, Any]]],
    **options: Any,
) -> list[dict[str, Any]]:
    """Every gate of ``gates`` that applies to ``target``, judged against ``reference``: one verdict row each
    (:func:`gate_verdict`; ``options`` are its samples / confidence / min_images). ``rows`` are the (target,
    reference) result rows; when either is missing or did not run, each gate is a FAIL row with ``error``.
    ``arrays`` returns the (target, reference) per-image arrays, read only when a gate is judged."""
    out: list[dict[str, Any]] = []
    row, ref = rows
    loaded: tuple[dict[str, Any], dict[str, Any]] | None = None
    for gate in (g for g in gates if g.applies(target)):
        head = {"model": model, "target": target, "reference": reference, "gate": gate.describe()}
        failed = next((r for r in (ref, row) if r is None or r.get("status") != "ok"), False)
        if failed is not False:
            why = "the reference did not run" if failed is None or failed is ref else "the target did not run"
            err = (failed or {}).get("error", "no row")
            no_run = {"metric": gate.metric, "rule": gate.decision, "verdict": FAIL, "passed": False}
            out.append({**head, **no_run, "error": f"{why}: {err}"})
            continue
        loaded = loaded or arrays()
        d, ref_d = loaded
        paired = task.paired(gate.metric, d, ref_d, d.get("keys", []), score_threshold=gate.score_threshold)
        out.append({**head, **gate_verdict(gate, paired, **options)})
    return out


def gate_verdict(
    gate: Gate, paired: PairedSample, samples: int = 1000, confidence: float = 0.95, min_images: int = 1
) -> dict[str, Any]:
    """One verdict row: point values, the gated quantity, its interval, the rule and PASS / FAIL / INCONCLUSIVE.

    A point-rule PASS whose interval does not clear the threshold stays PASS and is marked ``underpowered``,
    with ``images_to_settle`` filled as for an INCONCLUSIVE verdict: the point value clears the gate but these
    images cannot show that the target would on more of them."""
    value = gate.value(paired.target, paired.reference)
    settle: int | None = None
    if paired.per_image is not None and not gate.absolute:
        t, r = paired.per_image
        exact = paired_verdict(
            t, r, relative=gate.relative, max_drop_points=gate.max_drop_points, confidence=confidence, rule="interval"
        )
        lo, hi, method, settle = exact["ci_low"], exact["ci_high"], "exact", exact["images_to_settle"]
    elif paired.per_image is not None or (paired.values is not None and paired.binary):
        values = paired.per_image[0] if paired.per_image is not None else paired.values
        lo, hi, settle = _proportion_interval(gate, np.asarray(values, np.float64), paired.reference, confidence)
        method = "exact: Clopper-Pearson"
    else:
        if paired.values is not None:
            lo, hi = _gated(gate, *_bootstrap_mean(np.asarray(paired.values, np.float64), samples, confidence),
                            paired.reference)  # fmt: skip
            method = f"bootstrap, {samples} resamples (approximate)"
        else:
            stat = bootstrap_gate_values(gate, paired, samples)
            finite = stat[~np.isnan(stat)]
            alpha = (1.0 - confidence) / 2.0
            lo, hi = (
                (float(np.quantile(finite, alpha)), float(np.quantile(finite, 1.0 - alpha)))
                if finite.size
                else (float("nan"), float("nan"))
            )
            method = f"bootstrap, {stat.size} resamples (approximate)"
        if gate_decide(gate, value, lo, hi, "interval") == INCONCLUSIVE:
            settle = _bootstrap_images_to_settle(value, lo, hi, gate.threshold, paired.images)
    verdict = gate_decide(gate, value, lo, hi, gate.decision)
    settled_by_interval = gate_decide(gate, value, lo, hi, "interval") == PASS
    if paired.images < min_images:
        verdict, settle = INCONCLUSIVE, max(min_images, settle or 0)
    underpowered = verdict == PASS and not settled_by_interval
    return {
        "metric": paired.metric,
        "gate": gate.describe(),
        "kind": gate.kind,
        "rule": gate.decision,
        "threshold": gate.threshold,
        "unit": _unit(gate, paired),
        "reference_value": paired.reference,
        "target_value": paired.target,
        "delta_points": 100.0 * (paired.target - paired.reference) if paired.unit == "fraction" else None,
        "value": value,
        "ci_low": lo,
        "ci_high": hi,
        "confidence": confidence,
        "interval": method,
        "images": paired.images,
        "min_images": min_images,
        "verdict": verdict,
        "passed": verdict == PASS,
        "underpowered": underpowered,
        "images_to_settle": settle if verdict == INCONCLUSIVE or underpowered else None,
    }


def _unit(gate: Gate, paired: PairedSample) -> str:
    """What the gated quantity and its interval are expressed in."""
    if gate.relative is not None:
        return "ratio"
    if gate.max_drop_points is not None:
        return "points"
    return paired.unit


__all__ = [
    "FAIL", "INCONCLUSIVE", "PASS", "Overall", "bootstrap_gate_values", "gate_decide", "gate_verdict",
    "overall_verdict",
]  # fmt: skip


@dataclass(frozen=True)
class Overall:
    """A sign-off's overall verdict from its gate verdicts: what the console and the report lead with.

    Attributes:
        verdict: FAIL (a gate failed or a unit did not run), INCONCLUSIVE (no failure, some gate undecided) or
            PASS (every gate passed; some may be underpowered).
        gates: Gate verdicts counted.
        passed: PASS verdicts (underpowered ones included).
        inconclusive: INCONCLUSIVE verdicts.
        underpowered: PASS verdicts whose interval does not clear the threshold.
        images_needed: The most images any undecided or underpowered gate needs to settle (None: unknown).
        failed_units: Units that did not run.
    """

    verdict: str
    gates: int
    passed: int
    inconclusive: int
    underpowered: int
    images_needed: int | None
    failed_units: int = 0

    @property
    def headline(self) -> str:
        need = f" ({self.images_needed} images needed)" if self.images_needed else ""
        if self.verdict == PASS and self.underpowered:
            return f"PASS, but {self.underpowered} of {self.gates} gates are underpowered{need}"
        text = f"{self.verdict}: {self.passed} of {self.gates} gates passed"
        if self.inconclusive:
            text += f", {self.inconclusive} inconclusive{need if self.verdict == INCONCLUSIVE else ''}"
        if self.underpowered:
            text += f", {self.underpowered} of them underpowered"
        if self.failed_units:
            text += f"; {self.failed_units} unit(s) failed to run"
        return text

    @property
    def css(self) -> str:
        """The colour class: green only for a PASS every gate's interval supports."""
        if self.verdict == PASS and self.underpowered:
            return "underpowered"
        return self.verdict.lower()

    def exit_code(self, strict: bool = False) -> int:
        """0 for PASS (underpowered too, under the point rule), 1 otherwise; ``strict`` also fails an
        underpowered PASS."""
        return 0 if self.verdict == PASS and not (strict and self.underpowered) else 1


def overall_verdict(verdicts: Sequence[dict[str, Any]], failed_units: int = 0) -> Overall:
    """The overall verdict of a sign-off's gate verdict rows (see :class:`Overall`)."""
    count = {k: sum(1 for v in verdicts if v.get("verdict") == k) for k in (PASS, FAIL, INCONCLUSIVE)}
    weak = [v for v in verdicts if v.get("verdict") == PASS and v.get("underpowered")]
    verdict = FAIL if count[FAIL] or failed_units or not verdicts else INCONCLUSIVE if count[INCONCLUSIVE] else PASS
    settle = [
        v["images_to_settle"]
        for v in verdicts
        if v.get("images_to_settle") and (v.get("verdict") == INCONCLUSIVE or v.get("underpowered"))
    ]
    return Overall(
        verdict, len(verdicts), count[PASS], count[INCONCLUSIVE], len(weak), max(settle) if settle else None,
        failed_units,
    )  # fmt: skip
