"""Edge-oriented Convolution Block (ECBSR, Zhang et al., ACM MM 2021) as such code is written: re-parameterized inline.

An ECB sums a 3x3 conv, a 1x1 -> 3x3 sequence and 1x1 -> fixed edge filters (Sobel-x,
Sobel-y, Laplacian), each filter a constant mask times a learnt per-channel scale. In
training the branches run; in ``eval()`` the block computes its one 3x3 kernel in
``forward``: the depthwise masks are written into the diagonal of a zero kernel,
composed with the 1x1 by a convolution of the kernels, and summed. That inline form
computes the same 3x3 kernel from the parameters on every call (dozens of ops, several
convolutions of weights), which repfx evaluates once (``fold_parameter_subgraphs``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_EDGE_MASKS = {
    "sobel_x": ((1.0, 0.0, -1.0), (2.0, 0.0, -2.0), (1.0, 0.0, -1.0)),
    "sobel_y": ((1.0, 2.0, 1.0), (0.0, 0.0, 0.0), (-1.0, -2.0, -1.0)),
    "laplacian": ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0)),
}


class EdgeBranch(nn.Module):
    """1x1 conv, then a depthwise fixed ``mask`` scaled per channel (the 1x1's bias pads the border)."""

    def __init__(self, channels: int, mask: str) -> None:
        super().__init__()
        self.point = nn.Conv2d(channels, channels, 1)
        self.scale = nn.Parameter(torch.randn(channels, 1, 1, 1) * 1e-3)
        self.bias = nn.Parameter(torch.randn(channels) * 1e-3)
        self.register_buffer("mask", torch.tensor(_EDGE_MASKS[mask]).expand(channels, 1, 3, 3).clone())

    def forward(self, x: Tensor) -> Tensor:
        border = self.point.bias.view(1, -1, 1, 1)
        y = F.pad(self.point(x) - border, (1, 1, 1, 1)) + border  # the border holds the 1x1's bias, not zeros
        return F.conv2d(y, self.scale * self.mask, self.bias, groups=y.shape[1])

    def kernel(self) -> tuple[Tensor, Tensor]:
        """The 3x3 kernel and bias of the branch: the depthwise kernel made dense, composed with the 1x1."""
        channels = self.mask.shape[0]
        depthwise = self.scale * self.mask
        dense = torch.zeros(channels, channels, 3, 3, device=depthwise.device)
        for c in range(channels):
            dense[c, c, :, :] = depthwise[c, 0, :, :]
        weight = F.conv2d(dense, self.point.weight.permute(1, 0, 2, 3))
        bias = dense.sum((2, 3)) @ self.point.bias + self.bias
        return weight, bias


class ECB(nn.Module):
    """3x3 + edge branches, then PReLU; ``eval()`` runs one conv whose kernel it computes in ``forward``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv3x3 = nn.Conv2d(channels, channels, 3, padding=1)
        self.edges = nn.ModuleList(EdgeBranch(channels, mask) for mask in _EDGE_MASKS)
        self.act = nn.PReLU(channels)

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            y = self.conv3x3(x) + sum(branch(x) for branch in self.edges)
        else:
            weight, bias = self.rep_params()
            y = F.conv2d(x, weight, bias, padding=1)
        return self.act(y)

    def rep_params(self) -> tuple[Tensor, Tensor]:
        weight, bias = self.conv3x3.weight, self.conv3x3.bias
        for branch in self.edges:
            w, b = branch.kernel()
            weight, bias = weight + w, bias + b
        return weight, bias


class ECBSRNet(nn.Module):
    """A few ECBs between a head and a tail conv, upsampled by pixel shuffle (a small ECBSR)."""

    def __init__(self, blocks: int = 2, channels: int = 8, scale: int = 2) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, channels, 3, padding=1)
        self.body = nn.Sequential(*(ECB(channels) for _ in range(blocks)))
        self.tail = nn.Conv2d(channels, 3 * scale * scale, 3, padding=1)
        self.shuffle = nn.PixelShuffle(scale)

    def forward(self, x: Tensor) -> Tensor:
        return self.shuffle(self.tail(self.body(self.head(x))))
