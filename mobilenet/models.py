"""The MobileNet family: v1 as in Howard et al. 2017, v2 and v3 bound to torchvision's definitions.

MobileNet v1 (with the paper's two ablations, Tables 4 and 5) is defined here because torchvision has none.
Its parameter and multiply-add counts reproduce the paper's Tables 4-7 (see ``tests/test_paper_tables.py``).
The v2 and v3 models are torchvision's own module trees, so torchvision's ImageNet checkpoints load key for
key, which is what ``--pretrained`` relies on.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from torchvision.models import mobilenetv2, mobilenetv3
from torchvision.ops.misc import Conv2dNormActivation

from common.registry import register_model

#: (output channels, stride) of the 13 depthwise separable layers of Table 1. The paper prints stride 2 for
#: the last one, but its input and output are both 7x7: that is a typo, every implementation uses stride 1.
V1_LAYERS: tuple[tuple[int, int], ...] = (
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    *[(512, 1)] * 5,
    (1024, 2),
    (1024, 1),
)

#: Table 5's "Shallow MobileNet": the five 14x14x512 separable layers removed.
V1_SHALLOW_LAYERS = tuple(layer for i, layer in enumerate(V1_LAYERS) if not 6 <= i <= 10)

#: The multipliers of Table 6. int(c * alpha) is exact for all of them (every width is a multiple of 32),
#: so the choice between truncating and rounding does not arise for the paper's values.
V1_WIDTH_MULTS = (1.0, 0.75, 0.5, 0.25)

ConvBNReLU = partial(Conv2dNormActivation, norm_layer=nn.BatchNorm2d, activation_layer=nn.ReLU)


def _separable(in_ch: int, out_ch: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        ConvBNReLU(in_ch, in_ch, kernel_size=3, stride=stride, groups=in_ch),
        ConvBNReLU(in_ch, out_ch, kernel_size=1),
    )


def _full(in_ch: int, out_ch: int, stride: int) -> nn.Module:
    return ConvBNReLU(in_ch, out_ch, kernel_size=3, stride=stride)


class MobileNetV1(nn.Module):
    """MobileNet v1: a 3x3 stem, a stack of (depthwise separable) layers, global pooling and one FC layer.

    Args:
        num_classes: width of the classifier.
        width_mult: the paper's width multiplier alpha; every layer gets ``int(c * alpha)`` channels.
        layers: (output channels, stride) of each layer after the stem.
        separable: depthwise separable layers (MobileNet) or full 3x3 convolutions (Table 4's "Conv MobileNet").
        dropout: dropout before the classifier. The paper uses none ("less regularization ... since small
            models have less trouble with overfitting"), hence the default of 0.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        layers: tuple[tuple[int, int], ...] = V1_LAYERS,
        separable: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        block = _separable if separable else _full
        in_ch = int(32 * width_mult)
        modules: list[nn.Module] = [ConvBNReLU(3, in_ch, kernel_size=3, stride=2)]
        for out, stride in layers:
            out_ch = int(out * width_mult)
            modules.append(block(in_ch, out_ch, stride))
            in_ch = out_ch
        self.features = nn.Sequential(*modules)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(in_ch, num_classes))

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


_V1 = dict(head="classifier.1", image_size=224, width_mults=V1_WIDTH_MULTS)


@register_model(**_V1)
def mobilenet_v1(num_classes: int = 1000, **kwargs) -> nn.Module:
    """MobileNet v1 (Howard et al. 2017): 13 depthwise separable layers, width multiplier alpha."""
    return MobileNetV1(num_classes=num_classes, **kwargs)


# The width multiplier comes with the shared constructor at no cost, so the two ablations accept it too,
# although the paper reports them at alpha = 1 only.
@register_model(**_V1)
def mobilenet_v1_conv(num_classes: int = 1000, **kwargs) -> nn.Module:
    """MobileNet v1 with full 3x3 convolutions instead of depthwise separable ones (paper Table 4)."""
    return MobileNetV1(num_classes=num_classes, separable=False, **kwargs)


@register_model(**_V1)
def mobilenet_v1_shallow(num_classes: int = 1000, **kwargs) -> nn.Module:
    """MobileNet v1 without the five 14x14x512 separable layers (paper Table 5)."""
    return MobileNetV1(num_classes=num_classes, layers=V1_SHALLOW_LAYERS, **kwargs)


# torchvision rounds every width to a multiple of 8 (_make_divisible), as the reference TF implementation
# does, so these are the multipliers of the MobileNetV2 paper's published models.
@register_model(
    head="classifier.1",
    image_size=224,
    width_mults=(0.35, 0.5, 0.75, 1.0, 1.3, 1.4),
    torchvision_weights="MobileNet_V2_Weights",
)
def mobilenet_v2(num_classes: int = 1000, **kwargs) -> nn.Module:
    """MobileNet v2 (inverted residuals, linear bottlenecks), torchvision's definition."""
    return mobilenetv2.mobilenet_v2(num_classes=num_classes, **kwargs)


# torchvision's v3 builders forward width_mult to the MobileNetV3 class too, which refuses it: no multipliers.
@register_model(head="classifier.3", image_size=224, torchvision_weights="MobileNet_V3_Large_Weights")
def mobilenet_v3_large(num_classes: int = 1000, **kwargs) -> nn.Module:
    """MobileNet v3 Large (NAS blocks with squeeze-excite and hard-swish), torchvision's definition."""
    return mobilenetv3.mobilenet_v3_large(num_classes=num_classes, **kwargs)


@register_model(head="classifier.3", image_size=224, torchvision_weights="MobileNet_V3_Small_Weights")
def mobilenet_v3_small(num_classes: int = 1000, **kwargs) -> nn.Module:
    """MobileNet v3 Small (NAS blocks with squeeze-excite and hard-swish), torchvision's definition."""
    return mobilenetv3.mobilenet_v3_small(num_classes=num_classes, **kwargs)
