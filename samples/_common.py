"""Small building blocks shared by the sample models.

Every sample is written the way a researcher writes the *training* form of a
re-parameterizable network: plain ``nn.Conv2d`` / ``nn.BatchNorm2d`` modules
whose outputs are summed. Nothing here knows how to fuse itself; producing the
deploy form is repfx's job, from the traced graph alone.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

IntOrPair = int | tuple[int, int]


def conv_bn(
    in_channels: int,
    out_channels: int,
    kernel_size: IntOrPair,
    stride: int = 1,
    padding: IntOrPair = 0,
    groups: int = 1,
) -> nn.Sequential:
    """A bias-free convolution followed by BatchNorm.

    The conv has ``bias=False`` because the BN right after it supplies the
    shift; this is the most common branch shape in re-parameterizable blocks.
    Children are named ``conv`` and ``bn`` so state dicts read naturally.
    """
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size=kernel_size,
                stride=stride,
                padding=padding,
                groups=groups,
                bias=False,
            ),
            bn=nn.BatchNorm2d(out_channels),
        )
    )


class ClassifierHead(nn.Module):
    """Global average pool, flatten, linear: the usual ImageNet-style head.

    Kept as its own module so every sample net ends the same way and the
    interesting (multi-branch) part of each model stays easy to read.
    """

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(x)))
