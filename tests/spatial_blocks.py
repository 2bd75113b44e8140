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


class RepMLPUnit(nn.Module):
    """RepMLPNet's partition perceptron with its local perceptron, as its block writes them (no global
    perceptron): the map cut into ``h x w`` partitions, each mixed by an FC shared by channel groups (a grouped
    1x1 conv on the flattened partition, BN over the share-sets on the partition grid), beside depthwise kxk
    convs with BN on the same partitions. The convs are exact matrices on the flattened partition: one FC."""

    def __init__(self, channels: int = 8, sharesets: int = 4, h: int = 4, w: int = 4, kernels=(1, 3)) -> None:
        super().__init__()
        self.C, self.S, self.h, self.w = channels, sharesets, h, w
        self.fc3 = nn.Conv2d(sharesets * h * w, sharesets * h * w, 1, groups=sharesets, bias=False)
        self.fc3_bn = nn.BatchNorm2d(sharesets)
        self.kernels = kernels
        for k in kernels:
            setattr(self, f"repconv{k}", conv_bn(sharesets, sharesets, k, k // 2, sharesets))

    def partition(self, x, h_parts, w_parts):
        return x.reshape(-1, self.C, h_parts, self.h, w_parts, self.w).permute(0, 2, 4, 1, 3, 5)

    def partition_affine(self, x, h_parts, w_parts):
        out = self.fc3(x.reshape(-1, self.S * self.h * self.w, 1, 1))
        out = self.fc3_bn(out.reshape(-1, self.S, self.h, self.w))
        return out.reshape(-1, h_parts, w_parts, self.S, self.h, self.w)

    def forward(self, x):
        h_parts, w_parts = x.shape[2] // self.h, x.shape[3] // self.w
        partitions = self.partition(x, h_parts, w_parts)
        fc3_out = self.partition_affine(partitions, h_parts, w_parts)
        conv_inputs = partitions.reshape(-1, self.S, self.h, self.w)
        conv_out = 0
        for k in self.kernels:
            conv_out += getattr(self, f"repconv{k}")(conv_inputs)
        fc3_out += conv_out.reshape(-1, h_parts, w_parts, self.S, self.h, self.w)
        return fc3_out.permute(0, 3, 1, 4, 2, 5).reshape(x.shape)
