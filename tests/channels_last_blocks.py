"""Channels-last FFN blocks written the way UniRepLKNet and ConvNeXt V2 write theirs (our own code; issue 16, item 2).

Both run their FFN on ``[N, H, W, C]``: ``permute(0, 2, 3, 1) -> Linear -> GELU -> GRN ->
Linear``, then ``permute(0, 3, 1, 2)`` back to NCHW. UniRepLKNet follows the second linear
with a BatchNorm2d on the NCHW view and a layer scale ``gamma.view(1, -1, 1, 1)``, and
writes GRN as ``(gamma * Nx + 1) * x + beta``; ConvNeXt V2 writes GRN as ``gamma * (x *
Nx) + beta + x`` (beta is added to a sum of two tensors) and has no BN. UniRepLKNet's
large depthwise kernel has parallel dilated depthwise branches, each with a BN. GRN's
gamma and beta start at zero in the repositories; here they are drawn small and random,
as a trained model holds them (a zero beta moves nothing).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

# kernel size of the large kernel -> (kernel sizes, dilations) of its dilated branches, as UniRepLKNet pairs them
DILATED_BRANCHES = {5: ((3, 3), (1, 2)), 7: ((5, 3, 3), (1, 2, 3))}


def _small(*shape: int) -> nn.Parameter:
    return nn.Parameter(0.1 * torch.randn(shape))


def global_response(x):
    """GRN's ``Nx`` on ``[N, H, W, C]``: each channel's L2 norm over the map, over the mean of those norms."""
    gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
    return gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)


class GRNChannelsLastFused(nn.Module):
    """UniRepLKNet's GRN: ``(gamma * Nx + 1) * x + beta`` on ``[N, H, W, C]``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma, self.beta = _small(1, 1, 1, dim), _small(1, 1, 1, dim)

    def forward(self, x):
        return (self.gamma * global_response(x) + 1) * x + self.beta


class GRNChannelsLast(GRNChannelsLastFused):
    """ConvNeXt V2's GRN: ``gamma * (x * Nx) + beta + x`` on ``[N, H, W, C]``."""

    def forward(self, x):
        return self.gamma * (x * global_response(x)) + self.beta + x


class ToChannelsLast(nn.Module):
    def forward(self, x):
        return x.permute(0, 2, 3, 1)


class ToChannelsFirst(nn.Module):
    def forward(self, x):
        return x.permute(0, 3, 1, 2)


class SqueezeExcite(nn.Module):
    """Pool, 1x1 down, ReLU, 1x1 up, sigmoid, gate: UniRepLKNet's SE after the depthwise kernel."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.down, self.up = nn.Conv2d(dim, hidden, 1), nn.Conv2d(hidden, dim, 1)
        self.dim = dim

    def forward(self, x):
        gate = torch.sigmoid(self.up(F.relu(self.down(F.adaptive_avg_pool2d(x, 1)))))
        return x * gate.view(-1, self.dim, 1, 1)


class DilatedReparam(nn.Module):
    """A depthwise kxk with BN beside dilated depthwise branches, each with its BN, summed."""

    def __init__(self, dim: int, kernel: int) -> None:
        super().__init__()
        self.large = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim, bias=False)
        self.large_bn = nn.BatchNorm2d(dim)
        sizes, rates = DILATED_BRANCHES[kernel]
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Conv2d(dim, dim, k, padding=(r * (k - 1) + 1) // 2, dilation=r, groups=dim, bias=False),
                          nn.BatchNorm2d(dim)) for k, r in zip(sizes, rates))

    def forward(self, x):
        out = self.large_bn(self.large(x))
        for branch in self.branches:
            out = out + branch(x)
        return out


class UniRepLKNetBlock(nn.Module):
    """Dilated re-param kernel, BN, SE, then the channels-last FFN ending in a BN on the NCHW view, layer scale,
    residual."""

    def __init__(self, dim: int = 16, kernel: int = 7, ffn_factor: int = 4) -> None:
        super().__init__()
        hidden = ffn_factor * dim
        self.dwconv, self.norm = DilatedReparam(dim, kernel), nn.BatchNorm2d(dim)
        self.se = SqueezeExcite(dim, dim // 4)
        self.pwconv1 = nn.Sequential(ToChannelsLast(), nn.Linear(dim, hidden))
        self.act = nn.Sequential(nn.GELU(), GRNChannelsLastFused(hidden))
        self.pwconv2 = nn.Sequential(nn.Linear(hidden, dim, bias=False), ToChannelsFirst(), nn.BatchNorm2d(dim))
        self.gamma = nn.Parameter(0.5 + torch.rand(dim))

    def forward(self, x):
        y = self.se(self.norm(self.dwconv(x)))
        y = self.pwconv2(self.act(self.pwconv1(y)))
        return x + self.gamma.view(1, -1, 1, 1) * y


class LayerNormChannelsFirst(nn.Module):
    """LayerNorm over dim 1 of NCHW, written out as ConvNeXt and UniRepLKNet write it."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(0.5 + torch.rand(dim)), _small(dim), eps

    def forward(self, x):
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class UniRepLKNetSmall(nn.Module):
    """Stem, two stages (a 7x7 and a 5x5 block), a downsampling conv between, mean-pool, LayerNorm, head."""

    def __init__(self, dims: tuple[int, int] = (16, 32), classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0] // 2, 3, 2, 1), LayerNormChannelsFirst(dims[0] // 2), nn.GELU(),
                                  nn.Conv2d(dims[0] // 2, dims[0], 3, 2, 1), LayerNormChannelsFirst(dims[0]))
        self.stage1 = UniRepLKNetBlock(dims[0], 7)
        self.down = nn.Sequential(nn.Conv2d(dims[0], dims[1], 3, 2, 1), LayerNormChannelsFirst(dims[1]))
        self.stage2 = UniRepLKNetBlock(dims[1], 5)
        self.norm, self.head = nn.LayerNorm(dims[1]), nn.Linear(dims[1], classes)

    def forward(self, x):
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.head(self.norm(x.mean([-2, -1])))


class ConvNeXtV2Block(nn.Module):
    """Depthwise 7x7, then the channels-last FFN with ConvNeXt V2's GRN, a layer scale, back to NCHW, residual."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1, self.pwconv2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.grn = GRNChannelsLast(4 * dim)
        self.gamma = nn.Parameter(0.5 + torch.rand(dim))

    def forward(self, x):
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        y = self.pwconv2(self.grn(F.gelu(self.pwconv1(y))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)
