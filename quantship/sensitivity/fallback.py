"""Automatic fallback: rank layers by their worst harm over the backends, keep them in float greedily until the
gate passes on held-out images, then write both int8 models with that set and report what it costs."""

from __future__ import annotations

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
from quantship.sensitivity.scoring import HeldOut, gate_passes, harm_key, score
from quantship.sensitivity.setup import SensitivitySetup

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
        results = [(b.name, score(b.run(verify.x, float_layers=floats), verify)) for b in backends]
        ok = all(gate_passes(gate, m) for _, m in results)
        for name, m in results:
            steps.append(
                {"kind": "fallback", "backend": name, "float_layers": list(floats), "passed": gate_passes(gate, m), **m}
            )
        if ok:
            return FallbackResult(floats, True, steps)
        if k < limit:
            floats.append(ranking[k])
    return FallbackResult(floats, False, steps)


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
        from quantship.sensitivity.units import unit_backends

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
