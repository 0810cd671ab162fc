"""Why a target failed a gate, in one line: a layer-by-layer comparison with the reference (what ``quantship diff``
does) on a few evaluation images, read by :func:`quantship.evaluate.explain.failure_line`, and what passes instead.

Used wherever a gate is judged: ``quantship eval --gate``, sign-off (console, ``verdicts.jsonl``, report) and the
demo. The comparison runs only for failing targets and on at most :data:`WHY_IMAGES` images, so its cost is bounded
whatever the evaluation's size (one reference run and one target run per image, every tensor captured). It never
changes a verdict: when it cannot be computed (a runtime whose tensors diff cannot read, an artifact not on this
machine, a probe that fails), the line says so instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from quantship.convert.layer_names import KerasLayers
from quantship.errors import QuantshipError
from quantship.evaluate.diff import compare_targets, layer_rows
from quantship.evaluate.explain import failure_line, instead_clause
from quantship.evaluate.verdicts import FAIL, PASS
from quantship.manifest import Artifact
from quantship.models.loading import LoadedModel
from quantship.targets.base import LayerProbe, ProbeOptions, Target, check_layer_probe, make_layer_probe

WHY_IMAGES = 8  # images the why-line's comparison runs on (each one: every tensor of the reference and the target)

# (target name, its layer rows) -> the line; the default is failure_line without a per-image detail.
LineMaker = Callable[[str, list[dict[str, Any]]], str]
Images = np.ndarray | Callable[[], np.ndarray]  # the images, or how to read them (read only when a target fails)


def stored_artifacts(rows: Sequence[Mapping[str, Any]]) -> dict[str, Artifact | None]:
    """The artifacts of stored result rows for the probes: a file on this machine, None for a target run in memory
    (no artifact); a row whose file is not here is left out (its why-line says so)."""
    out: dict[str, Artifact | None] = {}
    for r in rows:
        path = r.get("artifact")
        if not path:
            out[r["target"]] = None
        elif Path(path).is_file():
            out[r["target"]] = Artifact(Path(path), {})
    return out


def layer_comparisons(
    loaded: LoadedModel,
    reference: Target,
    failing: Sequence[Target],
    artifacts: Mapping[str, Artifact | None],
    images: Images,
    threads: int | None = None,
) -> dict[str, list[dict[str, Any]] | str]:
    """Per failing target: its layer rows against ``reference`` on the first :data:`WHY_IMAGES` of ``images``
    (:func:`~quantship.evaluate.diff.layer_rows`), or the reason they could not be computed."""
    out: dict[str, list[dict[str, Any]] | str] = {}
    try:
        x = (images() if callable(images) else images)[:WHY_IMAGES]
        layers = KerasLayers.of(loaded.model)
    except Exception as exc:  # noqa: BLE001 - a why-line must never stop the job that judged the gate
        return {t.name: f"no images or layers to compare ({_short(exc)})" for t in failing}
    options = ProbeOptions(threads)
    probes: list[LayerProbe] = []
    try:
        try:
            probes.append(_probe(reference, artifacts, loaded, layers, options))
        except Exception as exc:  # noqa: BLE001 - idem
            return {t.name: f"the reference {reference.name} could not be probed ({_short(exc)})" for t in failing}
        for t in failing:
            try:
                probes.append(_probe(t, artifacts, loaded, layers, options))
            except Exception as exc:  # noqa: BLE001 - idem: this target's line says why instead
                out[t.name] = f"its tensors could not be read ({_short(exc)})"
        if len(probes) > 1:
            try:
                comparisons = compare_targets(probes, x, 4, progress=lambda it, **_: it)
            except Exception as exc:  # noqa: BLE001 - idem
                return {**out, **{p.name: f"the comparison failed ({_short(exc)})" for p in probes[1:]}}
            for comp in comparisons:
                out[comp.target] = layer_rows(comp, layers.order, layers.inputs, layers.types)
    finally:
        for p in probes:
            p.close()
    return out


def _probe(
    target: Target, artifacts: Mapping[str, Artifact | None], loaded: LoadedModel, layers: KerasLayers, options: Any
) -> LayerProbe:
    check_layer_probe(target)
    if target.name not in artifacts:  # in memory (Keras) is a None entry; absent means no file here
        raise QuantshipError(f"{target.name}'s artifact is not on this machine")
    return make_layer_probe(target, artifacts[target.name], loaded, layers, options)


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return (text[0][:160] if text else type(exc).__name__) or type(exc).__name__


def gate_outcomes(verdicts: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[str]]:
    """(failing, passing) targets of verdict rows, in their order of first appearance: failing = a FAIL verdict
    of a target that ran (a row without ``error``); passing = every verdict of the target PASS."""
    names = list(dict.fromkeys(v["target"] for v in verdicts))
    ran_and_failed = {v["target"] for v in verdicts if v["verdict"] == FAIL and "error" not in v}
    failing = [t for t in names if t in ran_and_failed]
    passing = [t for t in names if all(v["verdict"] == PASS for v in verdicts if v["target"] == t)]
    return failing, passing


def attach_why(verdicts: Sequence[dict[str, Any]], lines: Mapping[str, str]) -> None:
    """``why`` and ``why_images`` on each FAIL verdict whose target has a line (in place)."""
    for v in verdicts:
        if v["verdict"] == FAIL and v["target"] in lines:
            v["why"], v["why_images"] = lines[v["target"]], WHY_IMAGES


def why_lines(
    loaded: LoadedModel,
    reference: Target,
    failing: Sequence[Target],
    artifacts: Mapping[str, Artifact | None],
    images: Images,
    instead: Mapping[str, str] | str = "",
    threads: int | None = None,
    line: LineMaker | None = None,
) -> dict[str, str]:
    """One line per failing target: where it parts from the reference and by how much, then what passes instead
    (``instead``: one text for all, or per target; see :func:`~quantship.evaluate.explain.instead_clause`)."""
    if not failing:
        return {}
    make = line or (lambda name, rows: failure_line(name, rows))
    compared = layer_comparisons(loaded, reference, failing, artifacts, images, threads)
    out = {}
    for t in failing:
        got = compared.get(t.name, "not compared")
        text = make(t.name, got) if isinstance(got, list) else f"{t.name}: why not computed: {got}"
        alt = instead.get(t.name, "") if isinstance(instead, Mapping) else instead
        out[t.name] = f"{text}; {alt}" if alt else text
    return out


__all__ = [
    "WHY_IMAGES",
    "attach_why",
    "gate_outcomes",
    "stored_artifacts",
    "instead_clause",
    "layer_comparisons",
    "why_lines",
]
