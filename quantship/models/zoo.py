"""The architectures the field benchmarks, registered with their default preprocessing.

Nothing is built or downloaded at import: each entry holds a builder that makes the model with random
weights (``weights=None``); trained weights come from the user's file or, for EfficientNet-Lite0/1/2 and
torchvision's MobileNetV2, from the offline ports in :mod:`quantship.models.pretrained`.
"""

from __future__ import annotations

import functools

from quantship.config import Interpolation, PreprocessSpec
from quantship.lazy import lazy_import
from quantship.models import ssd
from quantship.models.efficientnet_lite import build_efficientnet_lite
from quantship.models.mobilenet_v2_tv import build_mobilenet_v2_tv
from quantship.models.pretrained import (
    efficientnet_lite0_imagenet_weights,
    efficientnet_lite_imagenet_weights,
    mobilenet_v2_tv_imagenet_weights,
)
from quantship.models.registry import ModelSpec, register_model
from quantship.models.squeezenet import build_squeezenet_v1_1
from quantship.models.ssd import build_ssd_vgg16, build_ssdlite_mobilenet_v2


def _keras_app(app_name: str, size: int, **fixed):
    def build(num_classes: int = 1000, input_shape=None, classifier_activation: str | None = "softmax"):
        keras = lazy_import("keras")
        ctor = getattr(keras.applications, app_name)
        return ctor(
            weights=None,
            classes=num_classes,
            input_shape=input_shape or (size, size, 3),
            classifier_activation=classifier_activation,
            **fixed,
        )

    return build


def _register_keras_app(name, app_name, size, mode, family, crop_pct=0.875, description="", **fixed):
    register_model(
        ModelSpec(
            name=name,
            build=_keras_app(app_name, size, **fixed),
            input_size=(size, size),
            preprocess=PreprocessSpec.from_mode(mode, size=(size, size), crop_pct=crop_pct),
            family=family,
            description=description,
            extra={"keras_application": app_name, **fixed},
        )
    )


# Classic CNNs (Keras Applications). Eval crop: resize shorter side to crop/0.875, centre crop.
_register_keras_app("vgg16", "VGG16", 224, "caffe", "vgg", description="VGG16 (Simonyan & Zisserman)")
_register_keras_app("resnet50", "ResNet50", 224, "caffe", "resnet", description="ResNet-50 v1")
_register_keras_app("inception_v3", "InceptionV3", 299, "tf", "inception", description="Inception v3")
_register_keras_app(
    "inception_resnet_v2", "InceptionResNetV2", 299, "tf", "inception", description="Inception-ResNet v2"
)
_register_keras_app("xception", "Xception", 299, "tf", "xception", description="Xception")
_register_keras_app("densenet121", "DenseNet121", 224, "torch", "densenet", description="DenseNet-121")

# MobileNet v1 at every width multiplier and resolution of the original release.
for _alpha in (0.25, 0.5, 0.75, 1.0):
    for _res in (128, 160, 192, 224):
        _register_keras_app(
            f"mobilenet_{_alpha}_{_res}",
            "MobileNet",
            _res,
            "tf",
            "mobilenet",
            description=f"MobileNet v1, width {_alpha}, {_res}x{_res}",
            alpha=_alpha,
        )
_register_keras_app("mobilenet_v2", "MobileNetV2", 224, "tf", "mobilenet_v2", description="MobileNetV2 1.0 224")


def _squeezenet(num_classes: int = 1000, input_shape=None, classifier_activation="softmax"):
    return build_squeezenet_v1_1(num_classes, input_shape or (227, 227, 3), classifier_activation)


register_model(
    ModelSpec(
        name="squeezenet_v1_1",
        build=_squeezenet,
        input_size=(227, 227),
        preprocess=PreprocessSpec.from_mode("caffe", size=(227, 227)),
        family="squeezenet",
        description="SqueezeNet v1.1",
    )
)


def _efficientnet_lite(variant: str, num_classes: int = 1000, input_shape=None, classifier_activation="softmax"):
    return build_efficientnet_lite(variant, num_classes, input_shape, classifier_activation)


def _lite0_pretrained():
    return efficientnet_lite0_imagenet_weights()


def _lite_pretrained(variant: str):
    return efficientnet_lite_imagenet_weights(variant)


register_model(
    ModelSpec(
        name="efficientnet_lite0",
        build=functools.partial(_efficientnet_lite, "lite0"),
        input_size=(224, 224),
        # The preprocessing the ported ImageNet checkpoint expects; see quantship/models/pretrained.py.
        preprocess=PreprocessSpec(
            size=(224, 224),
            crop_pct=0.875,
            interpolation=Interpolation.BICUBIC,
            mean=(127.0, 127.0, 127.0),
            std=(128.0, 128.0, 128.0),
        ),
        family="efficientnet_lite",
        pretrained=_lite0_pretrained,
        description="EfficientNet-Lite0 (ReLU6, no SE); ImageNet weights built in",
    )
)
# Lite1/Lite2: the same port and preprocessing at their resolutions. TensorFlow's reference evaluation crops
# size / (size + 32) of the shorter side (CROP_PADDING = 32), which is 0.875 only at 224.
for _variant, _res in (("lite1", 240), ("lite2", 260)):
    register_model(
        ModelSpec(
            name=f"efficientnet_{_variant}",
            build=functools.partial(_efficientnet_lite, _variant),
            input_size=(_res, _res),
            preprocess=PreprocessSpec(
                size=(_res, _res),
                crop_pct=_res / (_res + 32),
                interpolation=Interpolation.BICUBIC,
                mean=(127.0, 127.0, 127.0),
                std=(128.0, 128.0, 128.0),
            ),
            family="efficientnet_lite",
            pretrained=functools.partial(_lite_pretrained, _variant),
            description=f"EfficientNet-Lite{_variant[-1]} {_res}x{_res} (ReLU6, no SE); ImageNet weights built in",
        )
    )


def _mobilenet_v2_tv(num_classes: int = 1000, input_shape=None, classifier_activation="softmax"):
    return build_mobilenet_v2_tv(num_classes, input_shape, classifier_activation)


def _mobilenet_v2_tv_pretrained():
    return mobilenet_v2_tv_imagenet_weights()


register_model(
    ModelSpec(
        name="mobilenet_v2_tv",
        build=_mobilenet_v2_tv,
        input_size=(224, 224),
        # torchvision's evaluation: PIL's (antialiased) bilinear resize of the shorter side to 256, 224 centre
        # crop placed as torchvision's CenterCrop places it, x/255 with the ImageNet mean/std; see
        # quantship/models/mobilenet_v2_tv.py.
        preprocess=PreprocessSpec.from_mode(
            "torch",
            size=(224, 224),
            crop_pct=0.875,
            interpolation=Interpolation.BILINEAR_ANTIALIAS,
            centre="round",
        ),
        family="mobilenet_v2",
        pretrained=_mobilenet_v2_tv_pretrained,
        description="MobileNetV2 1.0 224, torchvision layout (symmetric stride-2 padding); ImageNet weights built in",
    )
)


# --------------------------------------------------------------------------------------------- detection


def _ssd(size: int, num_classes: int = 21, input_shape=None, classifier_activation=None):
    return build_ssd_vgg16(size, num_classes)


def _ssdlite(num_classes: int = 21, input_shape=None, classifier_activation=None):
    return build_ssdlite_mobilenet_v2(num_classes)


def _anchors(kind: str):
    def make(num_classes: int = 21):
        return (
            ssd.ssd_anchor_config(int(kind), num_classes)
            if kind in ("300", "512")
            else ssd.ssdlite_anchor_config(num_classes)
        )

    return make


# The Keras SSD implementation feeds BGR images minus the ImageNet mean, resized to the input (no crop).
for _size in (300, 512):
    register_model(
        ModelSpec(
            name=f"ssd{_size}",
            build=functools.partial(_ssd, _size),
            input_size=(_size, _size),
            preprocess=PreprocessSpec(
                size=(_size, _size),
                crop_pct=1.0,
                mean=(123.0, 117.0, 104.0),
                std=(1.0, 1.0, 1.0),
                channel_order="bgr",
                resize="stretch",
            ),
            family="ssd",
            task="detection",
            num_classes=21,
            description=f"SSD{_size}, VGG16 + L2-normalised conv4_3 (Keras SSD layer names)",
            extra={"anchors": _anchors(str(_size))},
        )
    )
register_model(
    ModelSpec(
        name="ssdlite_mobilenet_v2",
        build=_ssdlite,
        input_size=(320, 320),
        preprocess=PreprocessSpec.from_mode("tf", size=(320, 320), crop_pct=1.0, resize="stretch"),
        family="ssdlite",
        task="detection",
        num_classes=21,
        description="SSDLite 320, MobileNetV2 backbone, depthwise-separable heads",
        extra={"anchors": _anchors("lite")},
    )
)
