"""RepLKNet-style large-kernel block (Ding et al., CVPR 2022), training form.

The core is :class:`LargeKernelConv`: a very large depthwise conv-BN (31x31
in the paper) in parallel with a small depthwise conv-BN (5x5), summed. Both
use ``padding = k // 2`` and the same stride, so the small kernel sits at the
centre of the large one and the pair fuses into one large depthwise conv.

:class:`RepLKBlock` wraps it the way RepLKNet does::

    x + BN(pw2( relu( LK( relu(BN(pw1( BN(x) ))) ) ) ))

The leading BN feeds a 1x1 conv with no padding, so it can be folded into
that conv *forwards* (BN before conv), another pattern repfx should handle.
The residual add is kept (drop-path is omitted: it is the identity in eval).
"""

from __future__ import annotations

import torch
from torch import nn

from ._common import conv_bn


class LargeKernelConv(nn.Module):
    """``BN(dwconv_large(x)) + BN(dwconv_small(x))``, both depthwise.

    ``small_kernel=None`` drops the small branch (plain large conv-BN).
    Kernels must be odd so the small one can be centred in the large one.
    """

    def __init__(
        self,
        channels: int,
        large_kernel: int = 31,
        small_kernel: int | None = 5,
        stride: int = 1,
    ) -> None:
        super().__init__()
        for k in (large_kernel, small_kernel):
            if k is not None and k % 2 != 1:
                raise ValueError(f"kernel sizes must be odd, got {k}")
        if small_kernel is not None and small_kernel > large_kernel:
            raise ValueError("small_kernel must not exceed large_kernel")
        self.large = conv_bn(
            channels, channels, large_kernel, stride, large_kernel // 2, groups=channels
        )
        self.small: nn.Sequential | None = None
        if small_kernel is not None:
            self.small = conv_bn(
                channels, channels, small_kernel, stride, small_kernel // 2, groups=channels
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.large(x)
        if self.small is not None:
            out = out + self.small(x)
        return out


class RepLKBlock(nn.Module):
    """Pre-BN, 1x1 expand, large-kernel depthwise, 1x1 project, residual.

    ``dw_channels`` is the width inside the block (defaults to ``channels``).
    The default ``large_kernel=31`` matches the paper; the registered sample
    uses 13 to stay cheap on a CPU.
    """

    def __init__(
        self,
        channels: int,
        dw_channels: int | None = None,
        large_kernel: int = 31,
        small_kernel: int | None = 5,
    ) -> None:
        super().__init__()
        dw_channels = channels if dw_channels is None else dw_channels
        self.pre_bn = nn.BatchNorm2d(channels)
        self.pw1 = conv_bn(channels, dw_channels, 1)
        self.act1 = nn.ReLU()
        self.large_kernel = LargeKernelConv(dw_channels, large_kernel, small_kernel)
        self.act2 = nn.ReLU()
        self.pw2 = conv_bn(dw_channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.pw1(self.pre_bn(x)))
        out = self.act2(self.large_kernel(out))
        return x + self.pw2(out)
