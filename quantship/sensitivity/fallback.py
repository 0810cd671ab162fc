"""Automatic fallback: rank layers by their worst harm over the backends, keep them in float greedily until the
gate passes on held-out images, then write both int8 models with that set and report what it costs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from quantship.config import CalibrationMethod, Gate
from quantship.convert.artifact import write_artifact
from quantship.convert.qdq import insert_qdq
from quantship.evaluate.latency import measure_latency
from quantship.evaluate.loop import runner_outputs
from quantship.runtime.base import RunnerOptions
from quantship.runtime.onnxruntime import QDQ_FAKE_QUANT
from quantship.runtime.registry import make_runner
from quantship.sensitivity.scoring import HeldOut, gate_passes, harm_key, layer_sensitivity, score
from quantship.sensitivity.setup import SensitivitySetup
from quantship.sensitivity.units import UnitBackend, unit_backends, unit_sensitivity

# -------------------------------------------------------------------------------------------- fallback


@dataclass
class FallbackResult:
    float_layers: list[str]
    passed: bool
    steps: list[dict[str, Any]] = field(default_factory=list)


def combined_ranking(per_backend: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Layers ordered by their worst single-layer harm over the backends (top-1 change, agreement, SQNR)."""
    worst: dict[str, tuple] = {}
    for rows in per_backend.values():
        for r in rows:
            key = harm_key(r)
            worst[r["layer"]] = min(worst.get(r["layer"], key), key)
    return sorted(worst, key=lambda name: worst[name])


def find_fallback(
    backends: Sequence[Any], ranking: Sequence[str], verify: HeldOut, gate: Gate, max_layers: int | None = None
) -> FallbackResult:
    """Greedy float set that makes *every* backend pass ``gate`` on ``verify`` (one set for all of them)."""
    floats: list[str] = []
    steps: list[dict[str, Any]] = []
    limit = len(ranking) if max_layers is None else min(max_layers, len(ranking))
    for k in range(limit + 1):
        ok, rows = _trial(backends, floats, verify, gate, kind="fallback")
        steps += rows
        if ok:
            return FallbackResult(floats, True, steps)
        if k < limit:
            floats.append(ranking[k])
    return FallbackResult(floats, False, steps)


def _trial(
    backends: Sequence[Any], floats: Sequence[str], verify: Any, gate: Gate, **fields: Any
) -> tuple[bool, list[dict[str, Any]]]:
    """Every backend run on ``verify`` with ``floats`` in float: (whether all pass ``gate``, one step row per
    backend carrying ``fields``)."""
    rows = []
    for b in backends:
        m = score(b.run(verify.x, float_layers=floats), verify)
        rows.append({**fields, "backend": b.name, "float_layers": list(floats), "passed": gate_passes(gate, m), **m})
    return all(r["passed"] for r in rows), rows


def prune_fallback(
    backends: Sequence[Any], floats: Sequence[str], verify: Any, gate: Gate
) -> tuple[list[str], list[dict[str, Any]]]:
    """Return to int8, one at a time from the last-added (least harmful) unit, every unit whose return keeps
    every backend passing ``gate`` on ``verify``: (the pruned float set, one step row per trial)."""
    kept = list(floats)
    steps: list[dict[str, Any]] = []
    for unit in reversed(list(floats)):
        trial = [f for f in kept if f != unit]
        ok, rows = _trial(backends, trial, verify, gate, kind="fallback_prune", returned_to_int8=unit)
        steps += rows
        if ok:
            kept = trial
    return kept, steps


def find_unit_fallback(
    backends: Sequence[UnitBackend], rank_set: Any, verify: Any, gate: Gate, layers_too: bool = True
) -> tuple[Any, list[dict[str, Any]]]:
    """The float set of units and layers that makes every backend pass ``gate`` on ``verify``: op units ranked
    alone-int8 on ``rank_set`` first (cheap: a model has few); only when they cannot pass, the weighted layers
    ranked the same way after them; greedy in rank order, then pruned. Returns (the
    :class:`FallbackResult` with the pruned set, the ranking rows)."""
    rows = {b.name: unit_sensitivity(b, rank_set) for b in backends}
    ranking = combined_ranking(rows)
    result = find_fallback(backends, ranking, verify, gate)
    if not result.passed and layers_too:
        for b in backends:
            rows[b.name] = rows[b.name] + layer_sensitivity(b.inner, rank_set)
        ranking = ranking + [r for r in combined_ranking(rows) if r not in ranking]
        result = find_fallback(backends, ranking, verify, gate)
    all_rows = [r for v in rows.values() for r in v]
    if not result.passed:
        return result, all_rows
    pruned, steps = prune_fallback(backends, result.float_layers, verify, gate)
    return FallbackResult(pruned, True, result.steps + steps), all_rows


def closest_set(steps: Sequence[dict[str, Any]], gate: Gate) -> tuple[list[str], dict[str, float]] | None:
    """The float set among a search's steps whose worst backend comes nearest to ``gate`` (the smaller set on a
    tie): (that set, the gated quantity per backend, as :meth:`~quantship.config.Gate.value` computes it), or
    None without steps. What a failed search reports and writes: the set that gets closest, not the last tried."""
    sign = 1.0 if gate.higher_is_better else -1.0
    sets: dict[tuple[str, ...], dict[str, float]] = {}
    for s in steps:
        if s.get("kind") in ("fallback", "fallback_prune") and gate.metric in s:
            value = gate.value(s[gate.metric], s[f"reference_{gate.metric}"])
            sets.setdefault(tuple(s["float_layers"]), {})[s["backend"]] = value

    def worst(values: dict[str, float]) -> float:
        good = [sign * v for v in values.values()]
        return -math.inf if any(v != v for v in good) else min(good)

    if not sets:
        return None
    floats, values = max(sets.items(), key=lambda kv: (worst(kv[1]), -len(kv[0])))
    return list(floats), values


def apply_fallback(
    setup: SensitivitySetup,
    float_layers: Sequence[str],
    method: CalibrationMethod | str = CalibrationMethod.MAX,
    threads: int = 2,
    units: bool = True,
) -> list[dict[str, Any]]:
    """Write the TFLite and Q/DQ int8 models with ``float_layers`` in float next to the plain int8 ones, and
    report what the fallback costs (file size, batch-1 latency) and gains (held-out metrics).

    ``float_layers`` may hold op unit keys (:mod:`quantship.sensitivity.units`) besides Keras layer names when
    ``units`` is set; a backend ignores the keys it has no op for."""

    method = CalibrationMethod.parse(method)
    art_dir = setup.work / "artifacts"
    name = setup.loaded.name
    base_manifest = {
        "source_model": {"name": name, "weights": setup.loaded.weights},
        "float_layers": list(float_layers),
    }
    rows = []
    tfl = setup.tflite()
    qdq = setup.qdq(method)
    if units:
        wrapped = unit_backends(setup, {"tflite": tfl, "qdq": qdq})
    for label, floats in (("int8", ()), ("int8+fallback", tuple(float_layers))):
        path = art_dir / f"{name}-tflite-{label.replace('+', '-')}.tflite"
        write_artifact(
            path,
            wrapped["tflite"].artifact(floats) if units else tfl.model_bytes(set(floats)),
            {**base_manifest, "format": "tflite", "precision": label, "float_layers": list(floats)},
        )
        if units:
            qdq_bytes = wrapped["qdq"].artifact(floats)
        else:
            qdq_bytes = insert_qdq(qdq.model, qdq.amax, exclude=floats, node_layers=qdq.node_layers)[0]
            qdq_bytes = qdq_bytes.SerializeToString()
        opath = art_dir / f"{name}-qdq-{method.value}-{label.replace('+', '-')}.onnx"
        write_artifact(
            opath,
            qdq_bytes,
            {
                **base_manifest,
                "format": "onnx",
                "precision": f"{label} (Q/DQ)",
                "float_layers": list(floats),
                "calibration_method": method.value,
            },
        )
        for backend, p, session in (("tflite", path, ()), ("qdq", opath, QDQ_FAKE_QUANT)):
            with make_runner(p, RunnerOptions(threads=threads, session_config=session)) as r:
                out = runner_outputs(r, setup.held.x)
                lat = measure_latency(r, setup.held.x[:1], warmup=5, min_iters=30)
            rows.append(
                {
                    "kind": "fallback_cost",
                    "backend": backend,
                    "variant": label,
                    "float_layers": list(floats),
                    "artifact": str(p),
                    "size_mb": p.stat().st_size / 1e6,
                    "latency_ms_p50": lat["latency_ms_p50"],
                    **score(out, setup.held),
                }
            )
    return rows
