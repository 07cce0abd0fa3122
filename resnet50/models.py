"""The ResNet family, bound to torchvision's definitions.

torchvision's ResNet-50 is v1.5: the stride-2 downsampling sits on the 3x3 convolution of the bottleneck,
not the first 1x1 (NVIDIA's ResNet-50 v1.5). Using torchvision's module tree means torchvision's ImageNet
checkpoints load key for key, which is what ``--pretrained`` relies on.
"""

from torchvision.models import resnet

from common.registry import register_model
from resnet50.small_images import SmallImageResNet

_COMMON = dict(head="fc", image_size=224)


@register_model(torchvision_weights="ResNet18_Weights", **_COMMON)
def resnet18(num_classes: int = 1000, **kwargs):
    """ResNet-18 (basic blocks 2-2-2-2)."""
    return resnet.resnet18(num_classes=num_classes, **kwargs)


@register_model(torchvision_weights="ResNet34_Weights", **_COMMON)
def resnet34(num_classes: int = 1000, **kwargs):
    """ResNet-34 (basic blocks 3-4-6-3)."""
    return resnet.resnet34(num_classes=num_classes, **kwargs)


@register_model(torchvision_weights="ResNet50_Weights", **_COMMON)
def resnet50(num_classes: int = 1000, **kwargs):
    """ResNet-50 v1.5 (bottlenecks 3-4-6-3, stride on the 3x3 convolution)."""
    return resnet.resnet50(num_classes=num_classes, **kwargs)


@register_model(torchvision_weights="ResNet101_Weights", **_COMMON)
def resnet101(num_classes: int = 1000, **kwargs):
    """ResNet-101 v1.5 (bottlenecks 3-4-23-3)."""
    return resnet.resnet101(num_classes=num_classes, **kwargs)


@register_model(torchvision_weights="ResNet152_Weights", **_COMMON)
def resnet152(num_classes: int = 1000, **kwargs):
    """ResNet-152 v1.5 (bottlenecks 3-8-36-3)."""
    return resnet.resnet152(num_classes=num_classes, **kwargs)


# ---- ResNets for small images (resnet50/small_images.py): 28-32 px inputs, no ImageNet weights.
_SMALL = dict(head="fc", image_size=32, crop_fraction=1.0)


@register_model(**_SMALL)
def resnet20(num_classes: int = 1000, **kwargs):
    """ResNet-20 for 32x32 images (He et al. 2016, 4.2: 3 stages of 3 basic blocks, 16-32-64 channels)."""
    return SmallImageResNet(3, (16, 32, 64), (1, 2, 2), num_classes, **kwargs)


@register_model(**_SMALL)
def resnet8_wide(num_classes: int = 1000, **kwargs):
    """ResNet-8 at twice ResNet-20's widths (32-64-128), every stage halving: the CPU quickstart's network."""
    return SmallImageResNet(1, (32, 64, 128), (2, 2, 2), num_classes, **kwargs)
