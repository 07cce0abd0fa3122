"""The six VGG configurations of Simonyan & Zisserman 2014 (Table 1), each with and without batch norm.

All of them are torchvision's ``VGG`` class over features built by torchvision's ``make_layers``, so the four
configurations torchvision ships (A, B, D, E as vgg11/13/16/19) have its module tree and load its ImageNet
checkpoints key for key. The two it lacks are derived from those: A-LRN is A with local response
normalisation after the first layer, C is D with 1x1 convolutions as the third layer of the last three stages.
torchvision's 7x7 adaptive average pool sits before the classifier, so the FC head works at any resolution
(the paper instead converts the FC layers to convolutions at test time, which gives the same scores at 224).
"""

from __future__ import annotations

import torch.nn as nn
from torchvision.models import vgg

from common.registry import register_model

#: Table 1, by the paper's column letters. Each entry: (torchvision cfg to build from, indices of the conv layers
#: that are 1x1 instead of 3x3, whether an LRN layer follows the first conv layer).
CONFIGS: dict[str, tuple[str, tuple[int, ...], bool]] = {
    "A": ("A", (), False),
    "A-LRN": ("A", (), True),
    "B": ("B", (), False),
    "C": ("D", (6, 9, 12), False),
    "D": ("D", (), False),
    "E": ("E", (), False),
}


def _lrn() -> nn.LocalResponseNorm:
    # The paper takes AlexNet's LRN (n=5, alpha=1e-4, beta=0.75, k=2), whose formula scales the sum of squares
    # by alpha; PyTorch scales it by alpha / size, hence alpha * size here to keep the paper's normalisation.
    return nn.LocalResponseNorm(size=5, alpha=1e-4 * 5, beta=0.75, k=2.0)


def make_features(config: str, batch_norm: bool) -> nn.Sequential:
    """The convolutional part of configuration ``config`` (a key of :data:`CONFIGS`)."""
    base, conv1x1, lrn = CONFIGS[config]
    features = vgg.make_layers(vgg.cfgs[base], batch_norm=batch_norm)
    convs = [i for i, m in enumerate(features) if isinstance(m, nn.Conv2d)]
    for k in conv1x1:
        old = features[convs[k]]
        features[convs[k]] = nn.Conv2d(old.in_channels, old.out_channels, kernel_size=1)
    if lrn:
        first_relu = next(i for i, m in enumerate(features) if isinstance(m, nn.ReLU))
        features.insert(first_relu + 1, _lrn())
    return features


def _vgg(config: str, batch_norm: bool, num_classes: int, **kwargs) -> vgg.VGG:
    # VGG's own init runs over the finished features, so the replaced 1x1 convolutions are initialised alike.
    return vgg.VGG(make_features(config, batch_norm), num_classes=num_classes, **kwargs)


_COMMON = dict(head="classifier.6", image_size=224)


@register_model(torchvision_weights="VGG11_Weights", **_COMMON)
def vgg11(num_classes: int = 1000, **kwargs) -> nn.Module:
    """VGG configuration A: 11 weight layers (8 conv + 3 FC)."""
    return _vgg("A", False, num_classes, **kwargs)


@register_model(torchvision_weights="VGG11_BN_Weights", **_COMMON)
def vgg11_bn(num_classes: int = 1000, **kwargs) -> nn.Module:
    """VGG configuration A with batch norm after every convolution."""
    return _vgg("A", True, num_classes, **kwargs)


@register_model(**_COMMON)
def vgg11_lrn(num_classes: int = 1000, **kwargs) -> nn.Module:
    """VGG configuration A-LRN: A with local response normalisation after the first layer."""
    return _vgg("A-LRN", False, num_classes, **kwargs)


@register_model(**_COMMON)
def vgg11_lrn_bn(num_classes: int = 1000, **kwargs) -> nn.Module:
    """VGG configuration A-LRN with batch norm after every convolution."""
    return _vgg("A-LRN", True, num_classes, **kwargs)


@register_model(torchvision_weights="VGG13_Weights", **_COMMON)
def vgg13(num_classes: int = 1000, **kwargs) -> nn.Module:
    """VGG configuration B: 13 weight layers (10 conv + 3 FC)."""
    return _vgg("B", False, num_classes, **kwargs)


@register_model(torchvision_weights="VGG13_BN_Weights", **_COMMON)
def vgg13_bn(num_classes: int = 1000, **kwargs) -> nn.Module:
    """VGG configuration B with batch norm after every convolution."""
    return _vgg("B", True, num_classes, **kwargs)


@register_model(**_COMMON)
def vgg16_conv1(num_classes: int = 1000, **kwargs) -> nn.Module:
    """VGG configuration C: 16 weight layers, 1x1 convolutions last in stages 3-5."""
    return _vgg("C", False, num_classes, **kwargs)


@register_model(**_COMMON)
def vgg16_conv1_bn(num_classes: int = 1000, **kwargs) -> nn.Module:
    """VGG configuration C with batch norm after every convolution."""
    return _vgg("C", True, num_classes, **kwargs)


@register_model(torchvision_weights="VGG16_Weights", **_COMMON)
def vgg16(num_classes: int = 1000, **kwargs) -> nn.Module:
    """VGG configuration D: 16 weight layers (13 conv + 3 FC)."""
    return _vgg("D", False, num_classes, **kwargs)


@register_model(torchvision_weights="VGG16_BN_Weights", **_COMMON)
def vgg16_bn(num_classes: int = 1000, **kwargs) -> nn.Module:
    """VGG configuration D with batch norm after every convolution."""
    return _vgg("D", True, num_classes, **kwargs)


@register_model(torchvision_weights="VGG19_Weights", **_COMMON)
def vgg19(num_classes: int = 1000, **kwargs) -> nn.Module:
    """VGG configuration E: 19 weight layers (16 conv + 3 FC)."""
    return _vgg("E", False, num_classes, **kwargs)


@register_model(torchvision_weights="VGG19_BN_Weights", **_COMMON)
def vgg19_bn(num_classes: int = 1000, **kwargs) -> nn.Module:
    """VGG configuration E with batch norm after every convolution."""
    return _vgg("E", True, num_classes, **kwargs)
