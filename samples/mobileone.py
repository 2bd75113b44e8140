"""MobileOne (Vasu et al., CVPR 2023), training form, S0-like.

A MobileOne block is a depthwise stage followed by a pointwise stage, each an
over-parameterized :class:`MobileOneUnit`: ``k`` parallel conv-BN branches of
the same shape, plus (for kernels larger than 1) a 1x1 conv-BN "scale"
branch, plus a bare BN identity branch when the shape is preserved. Every
unit collapses into one conv at deploy time; repfx has to find that alone.

What "S0-like" means here (chosen to match the published S0 layout):

* ``k = 4`` over-parameterized branches in every block;
* stem: a dense (groups=1) 3x3 unit, 3 -> 48 channels, stride 2, one branch
  plus the 1x1 scale branch, then ReLU;
* four stages of ``[2, 8, 10, 1]`` blocks with widths ``[48, 128, 256, 1024]``
  (``64*0.75, 128*1, 256*1, 512*2``); the first block of each stage has
  stride 2;
* head: global average pool + linear to 1000 classes.

No squeeze-excitation (S0 has none) and no deploy method.
"""

from __future__ import annotations

import torch
from torch import nn

from ._common import ClassifierHead, conv_bn

S0_BLOCKS: tuple[int, ...] = (2, 8, 10, 1)
S0_WIDTHS: tuple[int, ...] = (48, 128, 256, 1024)
S0_STEM_WIDTH = 48
S0_BRANCHES = 4


class MobileOneUnit(nn.Module):
    """Sum of ``num_branches`` kxk conv-BNs, an optional 1x1 scale conv-BN and
    an optional identity BN; no activation (the block adds it).

    The scale branch only exists for ``kernel_size > 1`` (for a 1x1 unit it
    would just be one more identical branch). The identity BN exists only
    when channels and spatial size are preserved.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        num_branches: int = 1,
    ) -> None:
        super().__init__()
        padding = kernel_size // 2
        self.branches = nn.ModuleList(
            conv_bn(in_channels, out_channels, kernel_size, stride, padding, groups)
            for _ in range(num_branches)
        )
        self.scale: nn.Sequential | None = (
            conv_bn(in_channels, out_channels, 1, stride, 0, groups) if kernel_size > 1 else None
        )
        self.identity: nn.BatchNorm2d | None = (
            nn.BatchNorm2d(in_channels)
            if in_channels == out_channels and stride == 1
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        if self.scale is not None:
            out = out + self.scale(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return out


class MobileOneBlock(nn.Module):
    """Depthwise 3x3 unit -> ReLU -> pointwise 1x1 unit -> ReLU.

    Splitting a block into two units (rather than one dense conv) is what
    keeps MobileOne cheap at inference; each unit is separately fusable.
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int = 1, num_branches: int = S0_BRANCHES
    ) -> None:
        super().__init__()
        self.depthwise = MobileOneUnit(
            in_channels, in_channels, 3, stride, groups=in_channels, num_branches=num_branches
        )
        self.act1 = nn.ReLU()
        self.pointwise = MobileOneUnit(
            in_channels, out_channels, 1, 1, groups=1, num_branches=num_branches
        )
        self.act2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act2(self.pointwise(self.act1(self.depthwise(x))))


class MobileOne(nn.Module):
    """Stem unit + stages of :class:`MobileOneBlock` + pooling classifier."""

    def __init__(
        self,
        blocks_per_stage: tuple[int, ...] = S0_BLOCKS,
        widths: tuple[int, ...] = S0_WIDTHS,
        stem_width: int = S0_STEM_WIDTH,
        num_branches: int = S0_BRANCHES,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            MobileOneUnit(3, stem_width, 3, stride=2, groups=1, num_branches=1), nn.ReLU()
        )
        in_channels = stem_width
        stages: list[nn.Sequential] = []
        for depth, width in zip(blocks_per_stage, widths):
            blocks = []
            for i in range(depth):
                blocks.append(MobileOneBlock(in_channels, width, 2 if i == 0 else 1, num_branches))
                in_channels = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.head = ClassifierHead(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


def mobileone_s0(num_classes: int = 1000) -> MobileOne:
    """The S0-like configuration documented at the top of this module."""
    return MobileOne(num_classes=num_classes)
