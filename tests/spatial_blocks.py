"""Blocks written the way RepNeXt, Inception, ACNet, MobileOne and VanillaNet write theirs (our own code).

Shared by ``tests/passes/test_spatial_models.py`` and ``bench/model_zoo.py``. Each is the training
form as its repository builds it: branches as modules, BatchNorms after convs, the
crop or the pool written in ``forward`` as the original does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn(cin: int, cout: int, kernel, padding=0, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=padding, groups=groups, bias=False), nn.BatchNorm2d(cout))


class RepNeXtMixer(nn.Module):
    """RepNeXt's multi-scale token mixer: a depthwise kxk beside a depthwise 1xk -> kx1 (one BN after the pair)
    and the identity, under one BN. The pair is a kxk of its own, so the sum is one depthwise kxk."""

    def __init__(self, dim: int = 16, kernel: int = 7) -> None:
        super().__init__()
        self.square = conv_bn(dim, dim, kernel, kernel // 2, dim)
        self.horizontal = nn.Conv2d(dim, dim, (1, kernel), padding=(0, kernel // 2), groups=dim, bias=False)
        self.vertical = conv_bn(dim, dim, (kernel, 1), (kernel // 2, 0), dim)
        self.norm = nn.BatchNorm2d(dim)

    def forward(self, x):
        return self.norm(x + self.square(x) + self.vertical(self.horizontal(x)))


class RepNeXtBlock(nn.Module):
    """Mixer, then a 1x1 MLP with a residual: RepNeXt's (and MetaFormer's) block."""

    def __init__(self, dim: int = 16, kernel: int = 7) -> None:
        super().__init__()
        self.mixer = RepNeXtMixer(dim, kernel)
        self.mlp = nn.Sequential(conv_bn(dim, 4 * dim, 1), nn.GELU(), nn.Conv2d(4 * dim, dim, 1))

    def forward(self, x):
        return x + self.mlp(self.mixer(x))


class FactorizedConv(nn.Module):
    """Inception-v3's spatial factorization without the activation between: 1x7 -> 7x1 -> BN."""

    def __init__(self, cin: int = 16, cout: int = 16, kernel: int = 7) -> None:
        super().__init__()
        self.row = nn.Conv2d(cin, cout, (1, kernel), padding=(0, kernel // 2), bias=False)
        self.column = nn.Conv2d(cout, cout, (kernel, 1), padding=(kernel // 2, 0), bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return torch.relu(self.bn(self.column(self.row(x))))


class CropLayer(nn.Module):
    """ACNet's crop: ``rows`` pixels off the top and bottom, ``cols`` off the left and right."""

    def __init__(self, rows: int, cols: int) -> None:
        super().__init__()
        self.rows, self.cols = rows, cols

    def forward(self, x):
        if self.rows == 0:
            return x[:, :, :, self.cols:-self.cols]
        if self.cols == 0:
            return x[:, :, self.rows:-self.rows, :]
        return x[:, :, self.rows:-self.rows, self.cols:-self.cols]


class ACBlockCrop(nn.Module):
    """ACNet's asymmetric block with ``padding < kernel // 2``: the 3x1 and 1x3 branches read crops of the input
    so that all three land on the square branch's (unpadded) output grid."""

    def __init__(self, cin: int = 8, cout: int = 8, kernel: int = 3, padding: int = 0) -> None:
        super().__init__()
        offset = padding - kernel // 2  # negative: crop
        self.square = conv_bn(cin, cout, kernel, padding)
        self.ver_crop, self.hor_crop = CropLayer(0, -offset), CropLayer(-offset, 0)
        self.ver = conv_bn(cin, cout, (kernel, 1), (padding, 0))
        self.hor = conv_bn(cin, cout, (1, kernel), (0, padding))

    def forward(self, x):
        return torch.relu(self.square(x) + self.ver(self.ver_crop(x)) + self.hor(self.hor_crop(x)))


class SEBlock(nn.Module):
    """MobileOne's squeeze-excite: an average pool over the whole map (its size read in ``forward``), then 1x1s."""

    def __init__(self, channels: int, ratio: float = 0.0625) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, max(1, int(channels * ratio)), 1)
        self.expand = nn.Conv2d(max(1, int(channels * ratio)), channels, 1)

    def forward(self, x):
        _, _, height, width = x.size()
        squeezed = F.avg_pool2d(x, kernel_size=[height, width])
        return x * torch.sigmoid(self.expand(F.relu(self.reduce(squeezed))))


class MobileOneSE(nn.Module):
    """A MobileOne block with SE: 3x3 + 1x1 + BN-identity branches, summed, squeeze-excited, ReLU."""

    def __init__(self, channels: int = 32) -> None:
        super().__init__()
        self.square, self.point = conv_bn(channels, channels, 3, 1), conv_bn(channels, channels, 1)
        self.skip = nn.BatchNorm2d(channels)
        self.se = SEBlock(channels)

    def forward(self, x):
        return torch.relu(self.se(self.square(x) + self.point(x) + self.skip(x)))


class VanillaBlock(nn.Module):
    """VanillaNet's deep-training block: its activation (ReLU, then a depthwise 7x7 written with ``F.conv2d`` and a
    BN), then the next 1x1 conv + BN: no nonlinearity between the depthwise 7x7 and the 1x1."""

    def __init__(self, dim: int = 32, act_num: int = 3) -> None:
        super().__init__()
        self.act_num = act_num
        self.weight = nn.Parameter(torch.randn(dim, 1, 2 * act_num + 1, 2 * act_num + 1) * 0.02)
        self.act_bn = nn.BatchNorm2d(dim)
        self.conv = conv_bn(dim, dim, 1)

    def forward(self, x):
        x = F.conv2d(torch.relu(x), self.weight, padding=self.act_num, groups=self.weight.shape[0])
        return F.leaky_relu(self.conv(self.act_bn(x)), 0.5)
