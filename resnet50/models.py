"""The ResNet family, bound to torchvision's definitions.

torchvision's ResNet-50 is v1.5: the stride-2 downsampling sits on the 3x3 convolution of the bottleneck,
not the first 1x1 (NVIDIA's ResNet-50 v1.5). Using torchvision's module tree means torchvision's ImageNet
checkpoints load key for key, which is what ``--pretrained`` relies on.
"""

from torchvision.models import resnet

from common.registry import register_model

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
