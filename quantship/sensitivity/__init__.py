"""Which layers lose accuracy when quantized, how few bits their weights can keep, and which layers to keep in
float so an int8 model passes its gate (as ModelOpt keeps ``onnx/quantization/sensitivity/``):

- :mod:`~quantship.sensitivity.scoring`: held-out images, scores against fp32, per-layer studies.
- :mod:`~quantship.sensitivity.backends`: the Q/DQ ONNX and TFLite variants a study quantizes layer by layer.
- :mod:`~quantship.sensitivity.weights`: weight-precision studies on the Keras model.
- :mod:`~quantship.sensitivity.fallback`: the fallback search and what the fallback costs.
- :mod:`~quantship.sensitivity.setup`: loading, splitting and exporting once for all analyses.
- :mod:`~quantship.sensitivity.analysis`: which analyses to run, and running them.
"""

from __future__ import annotations

from quantship.sensitivity.analysis import Analyses, run_analyses
from quantship.sensitivity.backends import QdqBackend, TfliteBackend
from quantship.sensitivity.fallback import FallbackResult, apply_fallback, combined_ranking, find_fallback
from quantship.sensitivity.scoring import (
    HeldOut,
    depthwise_vs_pointwise,
    gate_passes,
    harm_key,
    layer_sensitivity,
    layer_types,
    score,
    sqnr_db,
)
from quantship.sensitivity.setup import SensitivitySetup, SensitivitySpec, prepare
from quantship.sensitivity.weights import (
    WEIGHT_KINDS,
    fixed_point_int8,
    mantissa_truncate,
    weight_study,
    weight_variant,
)

__all__ = [
    "WEIGHT_KINDS",
    "Analyses",
    "FallbackResult",
    "HeldOut",
    "QdqBackend",
    "SensitivitySetup",
    "SensitivitySpec",
    "TfliteBackend",
    "apply_fallback",
    "combined_ranking",
    "depthwise_vs_pointwise",
    "find_fallback",
    "fixed_point_int8",
    "gate_passes",
    "harm_key",
    "layer_sensitivity",
    "layer_types",
    "mantissa_truncate",
    "prepare",
    "run_analyses",
    "score",
    "sqnr_db",
    "weight_study",
    "weight_variant",
]
