"""Preprocessing is data: each option changes the pixels exactly as declared."""

import numpy as np
import pytest

from quantship.config import Interpolation, PreprocessSpec
from quantship.data.preprocess import crop_views, decode_image, preprocess_image
from quantship.errors import ConfigError, DataError


def _img(h=60, w=80):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_resize_and_centre_crop_geometry():
    spec = PreprocessSpec(size=(20, 20), crop_pct=0.8)  # shorter side -> 25, then centre 20x20
    (view,) = crop_views(_img(), spec)
    assert view.shape == (20, 20, 3)
    assert spec.resize_shorter == 25


@pytest.mark.parametrize(
    "mode,first_pixel",
    [
        ("tf", lambda p: p / 127.5 - 1),
        ("torch", lambda p: (p / 255 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])),
        ("caffe", lambda p: (p - np.array([123.68, 116.779, 103.939]))[::-1]),
    ],
)
def test_normalisation_modes(mode, first_pixel):
    img = np.full((16, 16, 3), 0, np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 10, 100, 200
    spec = PreprocessSpec.from_mode(mode, size=(16, 16), crop_pct=1.0)
    x = preprocess_image(img, spec)
    np.testing.assert_allclose(x[0, 0, 0], first_pixel(np.array([10.0, 100.0, 200.0])), rtol=1e-5, atol=1e-4)


def test_nchw_layout_and_crop_counts():
    spec = PreprocessSpec(size=(16, 16), layout="nchw")
    assert preprocess_image(_img(), spec).shape == (1, 3, 16, 16)
    assert preprocess_image(_img(), spec.with_overrides(crops="10crop")).shape == (10, 3, 16, 16)
    assert preprocess_image(_img(), spec.with_overrides(crops="12crop")).shape == (12, 3, 16, 16)


def test_ten_crop_holds_mirrors():
    views = crop_views(_img(), PreprocessSpec(size=(16, 16), crops="10crop"))
    for a, b in zip(views[:5], views[5:]):
        np.testing.assert_array_equal(a[:, ::-1], b)


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="interpolation"):
        PreprocessSpec(interpolation="lanczos9")
    with pytest.raises(ConfigError, match="unknown normalisation mode"):
        PreprocessSpec().with_overrides(mode="yolo")
    with pytest.raises(ConfigError, match="unknown preprocessing option"):
        PreprocessSpec().with_overrides(colour="blue")


def test_decode_gray_and_rgba_to_rgb():
    import cv2

    gray = np.arange(64, dtype=np.uint8).reshape(8, 8)
    ok, buf = cv2.imencode(".png", gray)
    rgb = decode_image(buf.tobytes())
    assert rgb.shape == (8, 8, 3) and (rgb[..., 0] == gray).all()
    with pytest.raises(DataError, match="not a readable image"):
        decode_image(b"GIF89a garbage", "x.gif")


def test_resize_shorter_truncates_the_longer_side_as_torchvision():
    # torchvision's Resize(256) on a 300 x 451 image: int(256 * 451 / 300) = int(384.85) = 384 (rounding gives 385).
    from quantship.data.preprocess import resize_shorter

    img = np.zeros((300, 451, 3), np.uint8)
    assert resize_shorter(img, 256, Interpolation.BILINEAR).shape[:2] == (256, 384)
    assert resize_shorter(img.transpose(1, 0, 2), 256, Interpolation.BILINEAR).shape[:2] == (384, 256)
    assert resize_shorter(np.zeros((300, 300, 3), np.uint8), 256, Interpolation.BILINEAR).shape[:2] == (256, 256)
