"""VanillaNet (Chen et al., NeurIPS 2023) blocks in their deep-training form, as such code is written.

A block is 1x1 conv + BN, a ``leaky_relu`` whose negative slope the training schedule
anneals from 0 to 1 (``act_learn``), 1x1 conv + BN, then the "series" activation: a
ReLU followed by a depthwise 3x3 conv + BN. Once the slope reaches 1 the leaky_relu is
the identity, so the two 1x1 convs compose into one; the repository's converter does
that by hand, repfx sees it in the graph (``identity_activation`` in the rules).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class SeriesActivation(nn.Module):
    """ReLU, then a depthwise ``k x k`` conv + BN: an activation informed by its neighbours."""

    def __init__(self, channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(F.relu(x)))


class VanillaBlock(nn.Module):
    """``act(bn2(conv2(leaky_relu(bn1(conv1(x)), act_learn))))``; ``act_learn`` is set by the schedule."""

    def __init__(self, channels: int, out_channels: int | None = None, act_learn: float = 1.0) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.act_learn = act_learn
        self.conv1 = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.BatchNorm2d(channels))
        self.conv2 = nn.Sequential(nn.Conv2d(channels, out_channels, 1), nn.BatchNorm2d(out_channels))
        self.act = SeriesActivation(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        x = F.leaky_relu(self.conv1(x), self.act_learn)
        return self.act(self.conv2(x))


class VanillaNetSmall(nn.Module):
    """A stem (4x4 stride-4 conv, leaky_relu, 1x1) and a few blocks, every activation at ``act_learn``."""

    def __init__(self, channels: int = 16, blocks: int = 2, act_learn: float = 1.0) -> None:
        super().__init__()
        self.act_learn = act_learn
        self.stem1 = nn.Sequential(nn.Conv2d(3, channels, 4, stride=4), nn.BatchNorm2d(channels))
        self.stem2 = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.BatchNorm2d(channels))
        self.stem_act = SeriesActivation(channels)
        self.blocks = nn.Sequential(*(VanillaBlock(channels, act_learn=act_learn) for _ in range(blocks)))

    def forward(self, x: Tensor) -> Tensor:
        x = F.leaky_relu(self.stem1(x), self.act_learn)
        return self.blocks(self.stem_act(self.stem2(x)))
