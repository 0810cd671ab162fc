"""Shared fixtures: tiny models trained in seconds and small generated datasets in real on-disk formats."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

CLASSES = ("n01440764", "n01443537", "n01484850")  # tench, goldfish, great white shark: label ids 0, 1, 2
SIZE = 32


def synthetic_image(label: int, rng: np.random.Generator, size: int = 48) -> np.ndarray:
    """An RGB uint8 image whose class is told by its dominant colour and stripe direction."""
    img = rng.integers(0, 90, size=(size, size, 3)).astype(np.float32)
    img[..., label] += 120
    stripes = (np.arange(size) // 4) % 2
    if label == 1:
        img[stripes == 1, :, :] *= 0.6
    elif label == 2:
        img[:, stripes == 1, :] *= 0.6
    return np.clip(img, 0, 255).astype(np.uint8)


def synthetic_set(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for label in range(len(CLASSES)):
        for _ in range(n_per_class):
            xs.append(synthetic_image(label, rng))
            ys.append(label)
    return np.stack(xs), np.asarray(ys)


def encode(img: np.ndarray, ext: str = ".jpg") -> bytes:
    import cv2

    ok, buf = cv2.imencode(ext, cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return buf.tobytes()


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep caches (ported weights, model statistics) out of the user's home during tests, but share the
    ported EfficientNet weights across the session."""
    os.environ["QUANTSHIP_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield


def _tiny_model(num_classes: int = len(CLASSES)):
    import keras

    inputs = keras.Input((SIZE, SIZE, 3), name="input")
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="conv1")(inputs)
    x = keras.layers.DepthwiseConv2D(3, padding="same", activation="relu", name="dw1")(x)
    x = keras.layers.Conv2D(16, 1, activation="relu", name="pw1")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dense(num_classes, name="logits")(x)
    out = keras.layers.Activation("softmax", name="probs")(x)
    return keras.Model(inputs, out, name="tiny")


def tf_preprocess(imgs: np.ndarray) -> np.ndarray:
    """The preprocessing the tiny model is trained with: resize to 32 (crop_pct=1), x/127.5 - 1."""
    import cv2

    out = np.stack([cv2.resize(i, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR) for i in imgs]).astype(np.float32)
    return out / 127.5 - 1.0


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory):
    """A tiny CNN trained on the synthetic classes; returns (model, path of its .keras file)."""
    import keras

    keras.utils.set_random_seed(0)
    x, y = synthetic_set(60, seed=1)
    model = _tiny_model()
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(tf_preprocess(x), y, epochs=8, batch_size=32, verbose=0)
    path = tmp_path_factory.mktemp("model") / "tiny.keras"
    model.save(path)
    return model, path


def block_model():
    """Conv + BN + ReLU6, zero padding + stride-2 depthwise + BN + ReLU6, linear project + BN into a residual Add,
    pooling and a classifier: every tensor kind MobileNetV2 / EfficientNet-Lite have, in 24x24."""
    import keras

    keras.utils.set_random_seed(3)
    L = keras.layers
    inputs = keras.Input((24, 24, 3), name="input")
    x = L.Conv2D(8, 3, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = L.BatchNormalization(name="stem_bn")(x)
    x = L.ReLU(6.0, name="stem_relu6")(x)
    x = L.ZeroPadding2D((1, 1), name="dw_pad")(x)
    x = L.DepthwiseConv2D(3, strides=2, padding="valid", use_bias=False, name="dwconv")(x)
    x = L.BatchNormalization(name="dw_bn")(x)
    s = x = L.ReLU(6.0, name="dw_relu6")(x)
    x = L.Conv2D(8, 1, use_bias=False, name="project_conv")(x)
    x = L.BatchNormalization(name="project_bn")(x)
    x = L.Add(name="add")([x, s])
    x = L.GlobalAveragePooling2D(name="avg_pool")(x)
    x = L.Dense(4, name="predictions")(x)
    out = L.Activation("softmax", name="probs")(x)
    model = keras.Model(inputs, out, name="blocks")
    rng = np.random.default_rng(0)
    for layer in model.layers:  # batch norms with real statistics, so folding them changes the numbers
        if isinstance(layer, L.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights(
                [rng.uniform(0.5, 2, n), rng.normal(0, 0.5, n), rng.normal(0, 0.5, n), rng.uniform(0.5, 2, n)]
            )
    return model


TINY_PREPROCESS = "mode=tf,size=32,crop_pct=1.0"


def write_synset_dataset(root: Path, n_per_class: int, seed: int) -> Path:
    """ImageNet layout with one folder per synset holding generated JPEGs."""
    x, y = synthetic_set(n_per_class, seed=seed)
    for i, (img, label) in enumerate(zip(x, y)):
        d = root / CLASSES[label]
        d.mkdir(parents=True, exist_ok=True)
        (d / f"img_{i:03d}.JPEG").write_bytes(encode(img))
    return root


@pytest.fixture(scope="session")
def synset_dataset(tmp_path_factory) -> Path:
    """12 JPEGs per class."""
    return write_synset_dataset(tmp_path_factory.mktemp("synsets"), 12, seed=7)
