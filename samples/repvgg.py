"""RepVGG in its training ("multi-branch") form.

Architecture facts follow the RepVGG paper (Ding et al., CVPR 2021):

* five stages; stage widths ``min(64, 64a), 64a, 128a, 256a, 512b``;
* depths ``[1, 2, 4, 14, 1]`` for the A family and ``[1, 4, 6, 16, 1]`` for B;
* the first block of every stage has stride 2;
* every block sums a 3x3 conv-BN, a 1x1 conv-BN and (only when the shape is
  preserved) a bare BN "identity" branch, then applies ReLU;
* groupwise variants (``g2`` / ``g4``) use grouped convs on every second
  block, at global block indices 2, 4, 6, ..., 26 (the stem is index 0).

The model deliberately has no deploy / fuse method: collapsing each block into
a single 3x3 conv is what repfx must discover from the traced graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ._common import ClassifierHead, conv_bn

A_DEPTHS: tuple[int, ...] = (1, 2, 4, 14, 1)
B_DEPTHS: tuple[int, ...] = (1, 4, 6, 16, 1)

# Global block indices that become grouped in the g2 / g4 variants.
GROUPWISE_LAYERS: frozenset[int] = frozenset(range(2, 27, 2))


class RepVGGBlock(nn.Module):
    """``relu(BN(conv3x3(x)) + BN(conv1x1(x)) [+ BN(x)])``.

    The identity branch exists only when input and output shapes match
    (same channels, stride 1): otherwise there is no identity to add.
    Both convs share stride and groups so that all branches line up
    spatially and channel-wise, which is what makes the sum one conv.
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int = 1, groups: int = 1
    ) -> None:
        super().__init__()
        self.dense = conv_bn(in_channels, out_channels, 3, stride, 1, groups)
        self.pointwise = conv_bn(in_channels, out_channels, 1, stride, 0, groups)
        self.identity: nn.BatchNorm2d | None = (
            nn.BatchNorm2d(in_channels)
            if in_channels == out_channels and stride == 1
            else None
        )
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dense(x) + self.pointwise(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return self.act(out)


@dataclass(frozen=True)
class RepVGGConfig:
    """Everything that distinguishes one RepVGG variant from another."""

    depths: Sequence[int]
    width_a: float
    width_b: float
    groups: int = 1
    num_classes: int = 1000

    def stage_widths(self) -> list[int]:
        a, b = self.width_a, self.width_b
        return [min(64, int(64 * a)), int(64 * a), int(128 * a), int(256 * a), int(512 * b)]


class RepVGG(nn.Module):
    """Five stages of :class:`RepVGGBlock` followed by a pooling classifier."""

    def __init__(self, config: RepVGGConfig) -> None:
        super().__init__()
        if len(config.depths) != 5:
            raise ValueError(f"RepVGG needs 5 stage depths, got {list(config.depths)}")
        self.config = config
        widths = config.stage_widths()

        layer_index = 0  # global block index, used to place grouped blocks
        in_channels = 3
        stages: list[nn.Sequential] = []
        for depth, width in zip(config.depths, widths):
            blocks: list[RepVGGBlock] = []
            for i in range(depth):
                groups = config.groups if layer_index in GROUPWISE_LAYERS else 1
                stride = 2 if i == 0 else 1
                blocks.append(RepVGGBlock(in_channels, width, stride, groups))
                in_channels = width
                layer_index += 1
            stages.append(nn.Sequential(*blocks))

        self.stage0, self.stage1, self.stage2, self.stage3, self.stage4 = stages
        self.head = ClassifierHead(widths[-1], config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage0(x)
        x = self.stage1(x)
        x = self.stage2(x)
        x = self.stage3(x)
        x = self.stage4(x)
        return self.head(x)


# name -> (depths, a, b); groupwise variants are derived below.
_BASE_VARIANTS: dict[str, tuple[Sequence[int], float, float]] = {
    "a0": (A_DEPTHS, 0.75, 2.5),
    "a1": (A_DEPTHS, 1.0, 2.5),
    "a2": (A_DEPTHS, 1.5, 2.75),
    "b0": (B_DEPTHS, 1.0, 2.5),
    "b1": (B_DEPTHS, 2.0, 4.0),
    "b2": (B_DEPTHS, 2.5, 5.0),
    "b3": (B_DEPTHS, 3.0, 5.0),
}
_GROUPWISE_BASES: tuple[str, ...] = ("b1", "b2", "b3")


def repvgg_config(variant: str, num_classes: int = 1000) -> RepVGGConfig:
    """Config for a variant name such as ``"a0"``, ``"b1"`` or ``"b2g4"``."""
    base, groups = variant, 1
    for g in (2, 4):
        if variant.endswith(f"g{g}") and variant[: -2] in _GROUPWISE_BASES:
            base, groups = variant[:-2], g
    if base not in _BASE_VARIANTS:
        raise ValueError(f"unknown RepVGG variant {variant!r}; valid: {repvgg_variants()}")
    depths, a, b = _BASE_VARIANTS[base]
    return RepVGGConfig(depths, a, b, groups, num_classes)


def repvgg_variants() -> list[str]:
    """All variant names, plain ones first, then the groupwise ones."""
    names = list(_BASE_VARIANTS)
    names += [f"{base}g{g}" for base in _GROUPWISE_BASES for g in (2, 4)]
    return names


def repvgg(variant: str, num_classes: int = 1000) -> RepVGG:
    """Build a training-form RepVGG, e.g. ``repvgg("a0")``."""
    return RepVGG(repvgg_config(variant, num_classes))
