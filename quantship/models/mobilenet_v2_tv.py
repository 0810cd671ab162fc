"""MobileNetV2 with torchvision's layout, so that torchvision's ImageNet checkpoint ports by name.

The same network as Keras Applications' ``MobileNetV2`` (expand 1x1, depthwise 3x3, linear project 1x1,
ReLU6), but with PyTorch's conventions where they change the numbers:

* a stride-2 3x3 convolution pads one pixel on every side. Keras ``padding="same"`` pads 0 on top/left and
  1 on bottom/right for even inputs, which shifts every stride-2 sampling grid by one pixel; the builder
  pads explicitly (``ZeroPadding2D((1, 1))`` + ``valid``). Stride-1 3x3 ``same`` padding is symmetric and
  left as it is. With the checkpoint's weights, Keras' ``same`` puts the activations after block 3 up to
  5.8 away from PyTorch's (symmetric: 5e-6) and moves the probabilities by an L1 distance of 0.52 on average
  over five photos (top-1 changes on two of five);
* batch norm epsilon 1e-5 (Keras Applications use 1e-3);
* the classifier's dropout is left out: it does nothing at inference.

Layers are named after torchvision's ``features.N``: the stem (``features.0``) is ``stem_*``, the inverted
residual blocks ``features.1`` .. ``features.17`` are ``block{N}_*`` with the same ``N``, the last 1x1
convolution (``features.18``) is ``head_*`` and ``classifier.1`` is ``predictions``, followed by a softmax
``probs`` like every classifier of the zoo. :func:`torchvision_to_keras_weights` maps a state dict onto
these names.

Resizing. torchvision evaluates these weights on PIL images, and PIL's bilinear resize widens its filter
when shrinking (antialiasing); OpenCV's ``INTER_LINEAR`` does not. Shorter side to 256 on 19 images that
scikit-image ships (scale 0.18 to 1.5), against PIL, as mean |pixel difference| (0..255) / mean L1 distance
of this model's probabilities / top-1 agreement: ``INTER_LINEAR`` 1.62 / 0.26 / 84%, ``INTER_AREA`` 1.30 /
0.22 / 84%, ``INTER_CUBIC`` 2.93 / 0.40 / 84%, Gaussian blur then ``INTER_LINEAR`` 0.32 / 0.05 / 100%. So
the registry entry uses ``Interpolation.BILINEAR_ANTIALIAS``, which is PIL's resize itself (0 / 0 / 100%).
The geometry is torchvision's too: the longer side is truncated (451 x 256 / 300 -> 384; quantship rounded it
to 385 before) and an odd crop margin is split as CenterCrop splits it (``int(round(159 / 2))`` = 80; the floor
gives 79): ``centre="round"`` in the spec. Before both, the probabilities on two of five photos moved by L1 0.27
and 0.28 from torchvision's pipeline (PIL resize, CenterCrop, normalisation); now they are equal (L1 0.0 on
chelsea, coffee, rocket, astronaut and the motorcycle; the rocket is then "drilling platform" 0.35, not missile).
"""

from __future__ import annotations

import numpy as np

from quantship.errors import ModelLoadError
from quantship.lazy import lazy_import

# torchvision's inverted_residual_setting: (expand_ratio t, channels c, repeats n, first stride s).
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9  # Keras' convention for PyTorch's momentum 0.1


def block_plan() -> list[tuple[int, int, int, int]]:
    """Per inverted-residual block ``features.1`` .. ``features.17``: (stride, expand, channels_in, channels_out)."""
    plan, cin = [], STEM_CHANNELS
    for t, c, n, s in INVERTED_RESIDUAL_SETTING:
        for r in range(n):
            plan.append((s if r == 0 else 1, t, cin, c))
            cin = c
    return plan


def build_mobilenet_v2_tv(
    num_classes: int = 1000,
    input_shape: tuple[int, int, int] | None = None,
    classifier_activation: str | None = "softmax",
    stride2_padding: str = "symmetric",
):
    """Build torchvision-layout MobileNetV2 (width 1.0) with random weights.

    Args:
        num_classes: Classifier width.
        input_shape: (H, W, 3); 224x224 by default.
        classifier_activation: ``softmax`` (probabilities) or None (logits).
        stride2_padding: ``symmetric`` (PyTorch, what the checkpoint needs) or ``keras_same`` (Keras' own
            ``same``; only there to show what the wrong padding does).

    Returns:
        A functional ``keras.Model`` named ``mobilenet_v2_tv``.
    """
    keras = lazy_import("keras")
    layers = keras.layers
    if stride2_padding not in ("symmetric", "keras_same"):
        raise ValueError(f"stride2_padding must be 'symmetric' or 'keras_same', got {stride2_padding!r}")

    def bn(name: str):
        return layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=name)

    def strided(x, layer_cls, prefix: str, **kw):
        # A 3x3 convolution with torchvision's padding=1 on every side.
        if kw["strides"] == 2 and stride2_padding == "symmetric":
            x = layers.ZeroPadding2D((1, 1), name=prefix + "pad")(x)
            return layer_cls(padding="valid", **kw)(x)
        return layer_cls(padding="same", **kw)(x)

    inputs = keras.Input(shape=input_shape or (224, 224, 3), name="input")
    x = strided(
        inputs,
        layers.Conv2D,
        "stem_",
        filters=STEM_CHANNELS,
        kernel_size=3,
        strides=2,
        use_bias=False,
        name="stem_conv",
    )
    x = bn("stem_bn")(x)
    x = layers.ReLU(6.0, name="stem_relu6")(x)
    for n, (stride, t, cin, cout) in enumerate(block_plan(), start=1):
        p = f"block{n}_"
        shortcut = x
        if t != 1:
            x = layers.Conv2D(cin * t, 1, use_bias=False, name=p + "expand_conv")(x)
            x = bn(p + "expand_bn")(x)
            x = layers.ReLU(6.0, name=p + "expand_relu6")(x)
        x = strided(
            x, layers.DepthwiseConv2D, p + "dw_", kernel_size=3, strides=stride, use_bias=False, name=p + "dwconv"
        )
        x = bn(p + "dw_bn")(x)
        x = layers.ReLU(6.0, name=p + "dw_relu6")(x)
        x = layers.Conv2D(cout, 1, use_bias=False, name=p + "project_conv")(x)
        x = bn(p + "project_bn")(x)
        if stride == 1 and cin == cout:
            x = layers.Add(name=p + "add")([x, shortcut])
    x = layers.Conv2D(HEAD_CHANNELS, 1, use_bias=False, name="head_conv")(x)
    x = bn("head_bn")(x)
    x = layers.ReLU(6.0, name="head_relu6")(x)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = layers.Dense(num_classes, name="predictions")(x)
    if classifier_activation:
        x = layers.Activation(classifier_activation, name="probs")(x)
    return keras.Model(inputs, x, name="mobilenet_v2_tv")


def _conv(w: np.ndarray) -> np.ndarray:  # (out, in, kh, kw) -> (kh, kw, in, out)
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def _depthwise(w: np.ndarray) -> np.ndarray:  # (ch, 1, kh, kw) -> (kh, kw, ch, 1)
    return np.ascontiguousarray(w.transpose(2, 3, 0, 1))


def _bn(sd: dict[str, np.ndarray], prefix: str) -> list[np.ndarray]:
    return [sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], sd[f"{prefix}.running_mean"], sd[f"{prefix}.running_var"]]


def torchvision_to_keras_weights(sd: dict[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
    """Map a torchvision ``mobilenet_v2`` state dict to ``{keras layer name: weights}``.

    Raises:
        ModelLoadError: A tensor is missing (another architecture's checkpoint).
    """
    try:
        out: dict[str, list[np.ndarray]] = {
            "stem_conv": [_conv(sd["features.0.0.weight"])],
            "stem_bn": _bn(sd, "features.0.1"),
            "head_conv": [_conv(sd["features.18.0.weight"])],
            "head_bn": _bn(sd, "features.18.1"),
            "predictions": [np.ascontiguousarray(sd["classifier.1.weight"].T), sd["classifier.1.bias"]],
        }
        for n, (_stride, t, _cin, _cout) in enumerate(block_plan(), start=1):
            f, p = f"features.{n}.conv.", f"block{n}_"
            # Block 1 has no expansion, so its torchvision indices are one lower.
            dw, proj = (f + "0", f + "1") if t == 1 else (f + "1", f + "2")
            if t != 1:
                out[p + "expand_conv"] = [_conv(sd[f + "0.0.weight"])]
                out[p + "expand_bn"] = _bn(sd, f + "0.1")
            out[p + "dwconv"] = [_depthwise(sd[dw + ".0.weight"])]
            out[p + "dw_bn"] = _bn(sd, dw + ".1")
            out[p + "project_conv"] = [_conv(sd[proj + ".weight"])]
            out[p + "project_bn"] = _bn(sd, f + ("2" if t == 1 else "3"))
    except KeyError as exc:
        raise ModelLoadError(f"checkpoint lacks tensor {exc} expected for torchvision MobileNetV2") from None
    return out
