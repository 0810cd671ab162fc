"""Why a sign-off gate failed: a ``why`` line on each FAIL verdict of a unit that ran, from the layer-by-layer
comparison with the plan's reference (:mod:`quantship.targets.why`), and what passed every gate instead.

Computed after the verdicts and never changing them; only for failing (model, target) pairs, on the first
:data:`~quantship.targets.why.WHY_IMAGES` evaluation images; the model is loaded once per model with a failure.
"""

from __future__ import annotations

from typing import Any, Sequence

from quantship.evaluate.diff import diff_images
from quantship.evaluate.explain import instead_clause
from quantship.models.loading import model_name
from quantship.progress import note
from quantship.signoff.plan import SignoffPlan
from quantship.targets import get_target
from quantship.targets.run import load_for
from quantship.targets.why import WHY_IMAGES, attach_why, gate_outcomes, stored_artifacts, why_lines


def explain_failed_gates(
    plan: SignoffPlan, verdicts: list[dict[str, Any]], rows: Sequence[dict[str, Any]], evalset: Any, preprocesses: dict
) -> None:
    """Add ``why`` to every FAIL verdict whose target and reference ran (in place)."""
    for entry in plan.models:
        mine = [v for v in verdicts if v.get("model") == model_name(entry.name)]
        failing, passing = gate_outcomes(mine)
        if not failing:
            continue
        note(f"why: {entry.name}: {', '.join(failing)} against {plan.reference} on {WHY_IMAGES} images")
        try:
            loaded = load_for(
                entry.name, entry.weights, preprocesses[entry.name], evalset, trust_savedmodel=plan.trust_savedmodel
            )
        except Exception as exc:  # noqa: BLE001 - the why-line never stops the sign-off that judged the gate
            lines = {t: f"{t}: why not computed: the model could not be loaded here ({exc})" for t in failing}
        else:
            preprocess = loaded.preprocess

            def images() -> Any:
                return diff_images(evalset, preprocess, 4, 2, limit=WHY_IMAGES)

            artifacts = stored_artifacts([r for r in rows if r.get("model") == loaded.name])
            lines = why_lines(
                loaded,
                get_target(plan.reference),
                [get_target(t) for t in failing],
                artifacts,
                images,
                instead_clause(passing),
                plan.threads,
            )
        attach_why(mine, lines)
