"""SqueezeNet v1.1 (Iandola et al., 2016; the v1.1 layout from the authors' repository)."""

from __future__ import annotations

from quantship.lazy import lazy_import

# (squeeze, expand) filters of fire2..fire9; max-pooling follows conv1, fire3 and fire5.
FIRES = ((16, 64), (16, 64), (32, 128), (32, 128), (48, 192), (48, 192), (64, 256), (64, 256))
POOL_AFTER = {"conv1", "fire3", "fire5"}


def build_squeezenet_v1_1(
    num_classes: int = 1000,
    input_shape: tuple[int, int, int] = (227, 227, 3),
    classifier_activation: str | None = "softmax",
):
    """Build SqueezeNet v1.1 with random weights (layer names ``fireN_squeeze1x1`` etc.)."""
    keras = lazy_import("keras")
    layers = keras.layers
    inputs = keras.Input(shape=input_shape, name="input")
    x = layers.Conv2D(64, 3, strides=2, padding="valid", activation="relu", name="conv1")(inputs)
    x = layers.MaxPooling2D(3, strides=2, name="pool1")(x)
    for n, (squeeze, expand) in enumerate(FIRES, start=2):
        name = f"fire{n}"
        s = layers.Conv2D(squeeze, 1, activation="relu", name=f"{name}_squeeze1x1")(x)
        e1 = layers.Conv2D(expand, 1, activation="relu", name=f"{name}_expand1x1")(s)
        e3 = layers.Conv2D(expand, 3, padding="same", activation="relu", name=f"{name}_expand3x3")(s)
        x = layers.Concatenate(axis=-1, name=f"{name}_concat")([e1, e3])
        if name in POOL_AFTER:
            x = layers.MaxPooling2D(3, strides=2, name=f"pool_{name}")(x)
    x = layers.Dropout(0.5, name="drop9")(x)
    x = layers.Conv2D(num_classes, 1, activation="relu", name="conv10")(x)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if classifier_activation:
        x = layers.Activation(classifier_activation, name="probs")(x)
    return keras.Model(inputs, x, name="squeezenet_v1_1")
