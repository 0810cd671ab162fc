"""``quantship models`` and ``quantship targets``: what the registries hold.

The model listing reads parameters and MACs from a table committed with the package
(``quantship/models/model_table.json``) instead of building every model: building the zoo takes about a
minute, and over a minute on a loaded machine, to print a list. ``tests/models/test_models.py`` checks every row
against the built model and fails for a registered model without a row; :func:`write_model_table` rewrites the
table after a model is added or changed. ``quantship models --live-stats`` counts by building.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from quantship.errors import QuantshipError
from quantship.fileio import write_text_atomic
from quantship.jobs import JobResult
from quantship.models.registry import ModelSpec
from quantship.models.registry import list_models as registered_models
from quantship.models.stats import count_macs, model_stats
from quantship.targets import DEFAULT_TARGETS, list_targets

__all__ = [
    "DEFAULT_TARGETS",
    "ModelStats",
    "committed_model_stats",
    "list_models",
    "list_target_lines",
    "measure_model_stats",
    "model_table_path",
    "write_model_table",
]

ABOUT = (
    "Parameters and multiply-accumulates (batch 1, convolutions and dense layers: "
    "quantship.models.stats.count_macs) of every registered model at its input size, read by `quantship models`. "
    "tests/models/test_models.py checks each row against the built model; regenerate with: "
    'python -c "from quantship.jobs.listing import write_model_table; write_model_table()"'
)


@dataclass(frozen=True)
class ModelStats:
    """One row of the model table.

    Attributes:
        input: (height, width) the counts were taken at: the model's registered input size.
        params: Parameters (trainable and not).
        macs: Multiply-accumulates of one forward pass at batch 1.
    """

    input: tuple[int, int]
    params: int
    macs: int

    def to_json(self) -> dict[str, object]:
        return {"input": list(self.input), "params": self.params, "macs": self.macs}


def model_table_path() -> Path:
    """The committed table (package data beside the model registry)."""
    return Path(str(resources.files("quantship.models").joinpath("model_table.json")))


def committed_model_stats(path: Path | None = None) -> dict[str, ModelStats]:
    """The committed table, by model name (no model is built).

    Raises:
        QuantshipError: The table is missing or malformed (a broken installation).
    """
    path = path or model_table_path()
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))["models"]
        return {
            name: ModelStats((int(r["input"][0]), int(r["input"][1])), int(r["params"]), int(r["macs"]))
            for name, r in rows.items()
        }
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise QuantshipError(
            f"{path}: the model table cannot be read ({type(exc).__name__}: {exc}); reinstall quantship, or run "
            "'quantship models --live-stats'"
        ) from None


def measure_model_stats(spec: ModelSpec) -> ModelStats:
    """Build ``spec``'s model (random weights) and count its parameters and MACs: seconds per model."""
    import keras

    model = spec.build()
    try:
        height, width = (int(d) for d in model.inputs[0].shape[1:3])
        return ModelStats((height, width), int(model.count_params()), count_macs(model))
    finally:
        del model
        keras.backend.clear_session()


def write_model_table(path: Path | None = None) -> Path:
    """Build every registered model and write the table (one row per line, in registry order)."""

    rows = [f"    {json.dumps(s.name)}: {json.dumps(measure_model_stats(s).to_json())}" for s in registered_models()]
    text = "{\n" + f'  "about": {json.dumps(ABOUT)},\n  "models": {{\n' + ",\n".join(rows) + "\n  }\n}\n"
    return write_text_atomic(path or model_table_path(), text)


def _live_stats(spec: ModelSpec) -> ModelStats:
    s = model_stats(spec.name)  # builds the model once per Keras version, then cached
    return ModelStats(spec.input_size, int(s["params"]), int(s["macs"]))


def _row(spec: ModelSpec, stats: ModelStats | None) -> tuple[str, ...]:
    pre = spec.preprocess
    return (
        spec.name,
        spec.task,
        f"{spec.input_size[0]}x{spec.input_size[1]}",
        f"{stats.params / 1e6:.2f}M" if stats else "-",
        f"{stats.macs / 1e6:.0f}M" if stats else "-",
        "yes" if spec.pretrained else "-",
        f"mean={'/'.join(f'{m:g}' for m in pre.mean)} std={'/'.join(f'{s:g}' for s in pre.std)} "
        f"{pre.channel_order.value} "
        + ("resize to input" if pre.resize.value == "stretch" else f"crop_pct={pre.crop_pct:g}")
        + f" {pre.interpolation.value}",
    )


def list_models(with_stats: bool = True, live_stats: bool = False) -> JobResult:
    """The registered models as a table: input size, parameters, MACs, built-in weights, preprocessing.

    Args:
        with_stats: Show parameters and MACs.
        live_stats: Count them by building each model (cached per Keras version) instead of reading the
            committed table; a model registered outside the package has a row only this way.
    """
    specs = registered_models()
    stats: dict[str, ModelStats | None] = {}
    missing: list[str] = []
    if with_stats and live_stats:
        stats = {spec.name: _live_stats(spec) for spec in specs}
    elif with_stats:
        table = committed_model_stats()
        for spec in specs:
            row = table.get(spec.name)
            # A row counted at another input size would be wrong: show no figure rather than a stale one.
            stats[spec.name] = row if row is not None and row.input == spec.input_size else None
            if stats[spec.name] is None:
                missing.append(spec.name)
    rows = [_row(spec, stats.get(spec.name)) for spec in specs]
    header = ("model", "task", "input", "params", "MACs", "built-in weights", "default preprocessing")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def fmt(r: tuple[str, ...] | list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()

    lines = [fmt(header), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)]
    if missing:
        lines.append(
            f"(no committed parameter/MAC counts for {', '.join(missing)}: 'quantship models --live-stats' counts "
            "them by building the models)"
        )
    return JobResult([], ["\n".join(lines)])


def list_target_lines() -> JobResult:
    return JobResult([], [f"{t.name:24s} {t.spec.description}" for t in list_targets()])
