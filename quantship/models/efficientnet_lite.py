"""EfficientNet-Lite in Keras: ReLU6, no squeeze-and-excitation, fixed stem/head, TF-style SAME padding.

Follows TensorFlow's reference ``efficientnet_lite_builder`` (the variant without squeeze-excite and with
ReLU6, made for integer accelerators). Layer names are stable so weights can be ported by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from quantship.lazy import lazy_import

# (repeats, kernel, stride, expand_ratio, filters_in, filters_out) of EfficientNet-B0 / Lite0.
BASE_BLOCKS = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)

BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99


@dataclass(frozen=True)
class LiteScaling:
    width: float
    depth: float
    resolution: int
    dropout: float


LITE_VARIANTS = {
    "lite0": LiteScaling(1.0, 1.0, 224, 0.2),
    "lite1": LiteScaling(1.0, 1.1, 240, 0.2),
    "lite2": LiteScaling(1.1, 1.2, 260, 0.3),
    "lite3": LiteScaling(1.2, 1.4, 280, 0.3),
    "lite4": LiteScaling(1.4, 1.8, 300, 0.3),
}


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    filters *= width
    new = max(divisor, int(filters + divisor / 2) // divisor * divisor)
    if new < 0.9 * filters:
        new += divisor
    return int(new)


def block_plan(variant: str = "lite0") -> list[tuple[int, int, int, int, int]]:
    """Per-block (kernel, stride, expand, filters_in, filters_out) after Lite scaling.

    Lite keeps the first and last stages' repeat counts unscaled, like the reference builder.
    """
    s = LITE_VARIANTS[variant]
    plan = []
    for stage, (repeats, k, stride, e, fin, fout) in enumerate(BASE_BLOCKS):
        fin, fout = _round_filters(fin, s.width), _round_filters(fout, s.width)
        if stage not in (0, len(BASE_BLOCKS) - 1):
            repeats = int(math.ceil(s.depth * repeats))
        for r in range(repeats):
            plan.append((k, stride if r == 0 else 1, e, fin if r == 0 else fout, fout))
    return plan


def build_efficientnet_lite(
    variant: str = "lite0",
    num_classes: int = 1000,
    input_shape: tuple[int, int, int] | None = None,
    classifier_activation: str | None = "softmax",
):
    """Build EfficientNet-Lite with random weights.

    Args:
        variant: ``lite0`` .. ``lite4``.
        num_classes: Classifier width.
        input_shape: (H, W, 3); defaults to the variant's resolution.
        classifier_activation: ``softmax`` (probabilities) or None (logits).

    Returns:
        A functional ``keras.Model`` named ``efficientnet_{variant}``.
    """
    keras = lazy_import("keras")
    layers = keras.layers
    s = LITE_VARIANTS[variant]
    if input_shape is None:
        input_shape = (s.resolution, s.resolution, 3)

    def bn(name: str):
        return layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=name)

    inputs = keras.Input(shape=input_shape, name="input")
    x = layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = bn("stem_bn")(x)
    x = layers.ReLU(6.0, name="stem_relu6")(x)
    for i, (k, stride, e, fin, fout) in enumerate(block_plan(variant)):
        p = f"block{i}_"
        shortcut = x
        if e != 1:
            x = layers.Conv2D(fin * e, 1, padding="same", use_bias=False, name=p + "expand_conv")(x)
            x = bn(p + "expand_bn")(x)
            x = layers.ReLU(6.0, name=p + "expand_relu6")(x)
        x = layers.DepthwiseConv2D(k, strides=stride, padding="same", use_bias=False, name=p + "dwconv")(x)
        x = bn(p + "dw_bn")(x)
        x = layers.ReLU(6.0, name=p + "dw_relu6")(x)
        x = layers.Conv2D(fout, 1, padding="same", use_bias=False, name=p + "project_conv")(x)
        x = bn(p + "project_bn")(x)
        if stride == 1 and fin == fout:
            x = layers.Add(name=p + "add")([x, shortcut])
    x = layers.Conv2D(1280, 1, padding="same", use_bias=False, name="head_conv")(x)
    x = bn("head_bn")(x)
    x = layers.ReLU(6.0, name="head_relu6")(x)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = layers.Dropout(s.dropout, name="top_dropout")(x)
    x = layers.Dense(num_classes, name="predictions")(x)
    if classifier_activation:
        x = layers.Activation(classifier_activation, name="probs")(x)
    return keras.Model(inputs, x, name=f"efficientnet_{variant}")
