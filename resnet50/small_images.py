"""ResNets for small images (28-32 px: Fashion-MNIST, CIFAR), after He et al. (2016), section 4.2.

ImageNet's stem (a 7x7 stride-2 convolution, then a max-pool) leaves a 32x32 image 8x8 maps before the first
block, which wastes most of ResNet-18's compute on maps of 4x4 and smaller. The paper's small-image networks
start instead with one 3x3 convolution and three stages of ``n`` basic blocks (torchvision's ``BasicBlock``) at
16, 32 and 64 channels, the first at full resolution, each later one halving it: ``6n + 2`` layers. A stage
whose shape changes gets a projection shortcut (1x1 convolution and BatchNorm, the paper's option B).
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, conv1x1, conv3x3


class SmallImageResNet(nn.Module):
    """A 3x3 stem, stages of basic blocks, global average pooling and one linear layer (``fc``)."""

    def __init__(self, blocks: int, widths: tuple[int, ...], strides: tuple[int, ...], num_classes: int = 1000):
        super().__init__()
        self.conv1 = conv3x3(3, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages, channels = [], widths[0]
        for width, stride in zip(widths, strides, strict=True):
            layers = []
            for i in range(blocks):
                s = stride if i == 0 else 1
                shortcut = None
                if s != 1 or channels != width:
                    shortcut = nn.Sequential(conv1x1(channels, width, s), nn.BatchNorm2d(width))
                layers.append(BasicBlock(channels, width, s, shortcut))
                channels = width
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        # Each block starts as the identity (its last BatchNorm's scale at zero, as torchvision's
        # zero_init_residual): short schedules train faster from it (Goyal et al., 2017).
        for m in self.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))
