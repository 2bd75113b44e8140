"""Asymmetric Convolution Block (ACNet, Ding et al., ICCV 2019), training form.

An ACB replaces one ``k x k`` conv-BN by three parallel conv-BN branches,
``k x k``, ``1 x k`` and ``k x 1``, whose outputs are summed. The thin kernels
are padded only along their long axis so that each one samples exactly the
centre row / centre column of the square kernel's window; that alignment is
why the three can later collapse into one ``k x k`` conv (the thin kernels
become a cross added onto the square one). ReLU is applied outside the sum.
"""

from __future__ import annotations

import torch
from torch import nn

from ._common import ClassifierHead, conv_bn


class ACBlock(nn.Module):
    """``act(BN(conv kxk) + BN(conv 1xk) + BN(conv kx1))``.

    ``kernel_size`` must be odd: with an even kernel the thin branches cannot
    be centred on the square window. ``activation=False`` gives the bare
    branch sum, useful when a test wants nothing but the fusable part.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        activation: bool = True,
    ) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"ACBlock needs an odd kernel size, got {kernel_size}")
        half = kernel_size // 2
        self.square = conv_bn(
            in_channels, out_channels, kernel_size, stride, half, groups
        )
        self.horizontal = conv_bn(
            in_channels, out_channels, (1, kernel_size), stride, (0, half), groups
        )
        self.vertical = conv_bn(
            in_channels, out_channels, (kernel_size, 1), stride, (half, 0), groups
        )
        self.act: nn.Module = nn.ReLU() if activation else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.square(x) + self.horizontal(x) + self.vertical(x))


class ACBNet(nn.Module):
    """A small classifier built only from ACBs.

    Mixes stride-1 and stride-2 blocks and one grouped block so the fusion of
    all three ACB shapes gets exercised, while staying cheap on a CPU.
    """

    def __init__(self, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            ACBlock(3, width, stride=2),  # stem
            ACBlock(width, width),
            ACBlock(width, 2 * width, stride=2),
            ACBlock(2 * width, 2 * width, groups=2),
            ACBlock(2 * width, 4 * width, stride=2),
        )
        self.head = ClassifierHead(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
