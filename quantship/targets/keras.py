"""Keras targets: the loaded model itself, run in memory (the fp32 reference)."""

from __future__ import annotations

from quantship.config import Precision, TargetSpec
from quantship.targets.base import BuildContext, register_target


def _in_memory(ctx: BuildContext, spec: TargetSpec) -> None:
    return None


register_target(TargetSpec("keras-fp32", "keras", Precision.FP32, description="Keras, float32 (reference)"), _in_memory)
