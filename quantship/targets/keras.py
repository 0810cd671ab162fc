"""Keras targets: the loaded model itself, run in memory (the fp32 reference)."""

from __future__ import annotations

from typing import Any

import numpy as np

from quantship.config import Precision, TargetSpec
from quantship.convert.layer_names import KerasLayers
from quantship.runtime.keras import layer_outputs
from quantship.targets.base import BuildContext, Capture, LayerProbe, register_layer_probe, register_target


def _in_memory(ctx: BuildContext, spec: TargetSpec) -> None:
    return None


register_target(TargetSpec("keras-fp32", "keras", Precision.FP32, description="Keras, float32 (reference)"), _in_memory)


# ------------------------------------------------------------------------------------ diff: layer probe


class KerasProbe(LayerProbe):
    """Keras: one multi-output model over every layer."""

    def __init__(self, name: str, model: Any, layers: KerasLayers):
        single = [n for n in layers.order if not isinstance(model.get_layer(n).output, (list, tuple, dict))]
        self.name, self.notes, self.tensors = name, [], {n: n for n in single}
        self._fn = layer_outputs(model, single)

    def run(self, x: np.ndarray) -> Capture:
        return {name: (value, None) for name, value in self._fn(x).items()}


register_layer_probe(
    "keras", lambda target, artifact, loaded, layers, options: KerasProbe(target.name, loaded.model, layers)
)
