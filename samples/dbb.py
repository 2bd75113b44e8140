"""Diverse Branch Block (DBB, Ding et al., CVPR 2021), training form.

A DBB replaces one ``k x k`` conv-BN by a sum of up to four branches:

(a) ``k x k`` conv -> BN;
(b) ``1 x 1`` conv -> BN                      (not for depthwise blocks);
(c) ``1 x 1`` conv -> BN+pad -> ``k x k`` average pool -> BN
    (depthwise blocks: just ``k x k`` average pool with padding -> BN);
(d) ``1 x 1`` conv -> BN+pad -> ``k x k`` conv -> BN.

Branches (c) and (d) are *sequential* chains, which is what makes DBB a hard
case for a re-parameterizer: the first BN sits between two convs, so the
zero padding of the ``k x k`` op must be replaced by padding with the value
that BN produces for a zero input. :class:`BNAndPad` does exactly that, so
each chain stays equivalent to one ``k x k`` conv.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ._common import ClassifierHead, conv_bn

PadStyle = Literal["slices", "shift"]


class BNAndPad(nn.Module):
    """BatchNorm, then pad every spatial side by ``pad`` with BN's zero-response.

    The border value per channel is ``bias - mean * weight / sqrt(var + eps)``,
    i.e. what BN outputs where the input was zero. Padding with it (rather than
    with 0) makes "1x1 conv -> BN -> kxk op" equal to "1x1 conv -> zero-pad ->
    BN -> kxk op", which is the form that merges into a single kxk conv.

    Two equivalent formulations, because users write it both ways:

    * ``"slices"`` (default): zero-pad, then overwrite the four border strips
      by slice assignment (in-place writes into the padded tensor);
    * ``"shift"``: ``F.pad(out - v, ...) + v``, purely functional.
    """

    def __init__(
        self,
        pad: int,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        style: PadStyle = "slices",
    ) -> None:
        super().__init__()
        if style not in ("slices", "shift"):
            raise ValueError(f"style must be 'slices' or 'shift', got {style!r}")
        self.pad = pad
        self.style = style
        self.bn = nn.BatchNorm2d(num_features, eps=eps, momentum=momentum)

    def zero_response(self) -> torch.Tensor:
        """Per-channel BN output for a zero input, shaped ``(1, C, 1, 1)``."""
        bn = self.bn
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        return (bn.bias - bn.running_mean * scale).view(1, -1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn(x)
        pad = self.pad
        if pad <= 0:
            return out
        value = self.zero_response()
        if self.style == "shift":
            return F.pad(out - value, [pad] * 4) + value
        out = F.pad(out, [pad] * 4)
        out[:, :, 0:pad, :] = value
        out[:, :, -pad:, :] = value
        out[:, :, :, 0:pad] = value
        out[:, :, :, -pad:] = value
        return out


class DiverseBranchBlock(nn.Module):
    """Sum of the DBB branches described in the module docstring.

    ``groups == out_channels`` is treated as depthwise: the 1x1 branch is
    dropped (a depthwise 1x1 adds little next to a depthwise kxk) and the
    average branch pools the input directly. ``internal_channels`` is the
    width between the 1x1 and kxk convs of branch (d); it defaults to
    ``in_channels`` and must be divisible by ``groups``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int | None = None,
        groups: int = 1,
        internal_channels: int | None = None,
        pad_style: PadStyle = "slices",
    ) -> None:
        super().__init__()
        if padding is None:
            padding = kernel_size // 2
        if internal_channels is None:
            internal_channels = in_channels
        depthwise = groups == out_channels
        self.depthwise = depthwise

        # (a) the plain kxk branch
        self.dense = conv_bn(in_channels, out_channels, kernel_size, stride, padding, groups)

        # (b) 1x1 branch; its padding keeps it centred on the kxk window.
        self.pointwise: nn.Sequential | None = None
        if not depthwise:
            self.pointwise = conv_bn(
                in_channels, out_channels, 1, stride, padding - kernel_size // 2, groups
            )

        # (c) average branch
        if depthwise:
            self.avg = nn.Sequential()
            self.avg.add_module("pool", nn.AvgPool2d(kernel_size, stride, padding))
        else:
            self.avg = nn.Sequential()
            self.avg.add_module(
                "conv",
                nn.Conv2d(in_channels, out_channels, 1, 1, 0, groups=groups, bias=False),
            )
            self.avg.add_module("bnpad", BNAndPad(padding, out_channels, style=pad_style))
            self.avg.add_module("pool", nn.AvgPool2d(kernel_size, stride, 0))
        self.avg.add_module("bn", nn.BatchNorm2d(out_channels))

        # (d) 1x1 -> kxk chain
        self.chain = nn.Sequential()
        self.chain.add_module(
            "conv1",
            nn.Conv2d(in_channels, internal_channels, 1, 1, 0, groups=groups, bias=False),
        )
        self.chain.add_module("bnpad", BNAndPad(padding, internal_channels, style=pad_style))
        self.chain.add_module(
            "conv2",
            nn.Conv2d(
                internal_channels, out_channels, kernel_size, stride, 0, groups=groups, bias=False
            ),
        )
        self.chain.add_module("bn", nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dense(x) + self.avg(x) + self.chain(x)
        if self.pointwise is not None:
            out = out + self.pointwise(x)
        return out


class DBBNet(nn.Module):
    """A small classifier of DBBs with ReLU between them.

    Includes a strided block and a depthwise block so both DBB layouts and
    both pooling forms are present in one graph.
    """

    def __init__(
        self, num_classes: int = 10, width: int = 32, pad_style: PadStyle = "slices"
    ) -> None:
        super().__init__()

        def dbb(cin: int, cout: int, stride: int = 1, groups: int = 1) -> DiverseBranchBlock:
            return DiverseBranchBlock(cin, cout, 3, stride, groups=groups, pad_style=pad_style)

        self.features = nn.Sequential(
            dbb(3, width, stride=2),  # stem
            nn.ReLU(),
            dbb(width, width),
            nn.ReLU(),
            dbb(width, 2 * width, stride=2),
            nn.ReLU(),
            dbb(2 * width, 2 * width, groups=2 * width),  # depthwise
            nn.ReLU(),
            dbb(2 * width, 4 * width, stride=2),
            nn.ReLU(),
        )
        self.head = ClassifierHead(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
