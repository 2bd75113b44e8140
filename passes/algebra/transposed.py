"""``TransposedConvForm``: a transposed convolution (``ConvTranspose1d/2d/3d``) and the ops that fold into it.

``conv_transpose(x, W)[o]`` sums ``W[c, o, tap] * x[c]`` over input channels and
taps, scattering each input pixel over a ``stride``-spaced output grid. Per tap,
the channel map is the matrix ``W[:, o, tap]``, exactly as for a forward kernel
``[C_out, C_in/g]``; only the spatial placement differs. So pointwise channel maps
compose with it through the forward algebra, on a *proxy*: the same taps written in
forward layout (``swap_channel_axes``), with the spatial geometry kept aside.

What is exact, and therefore all that is merged:

* ``then``: a per-channel affine or a 1x1 convolution after it (BatchNorm): the
  proxy's rows and bias change, the output grid does not;
* ``after``: a per-channel scale or a bias-free 1x1 convolution before it. A shift
  before it is refused: the transposed convolution of a constant image is not
  constant near the border and, with a stride, repeats with the stride;
* ``merge``: transposed convolutions of one input with the same geometry (kernel,
  stride, padding, output_padding, dilation): kernels add.

``as_forward``: with stride 1 and no output_padding a transposed convolution is a
forward convolution with the flipped kernel (and padding ``dilation*(k-1)-padding``),
so it becomes a plain ``ConvForm`` that merges like any conv.
Pure tensor math, like ``forms``: no torch.fx.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from repfx.passes.algebra.forms import ConvForm, NotExact, compose, merge_parallel, negligible


def swap_channel_axes(weight: Tensor, groups: int) -> Tensor:
    """``[A, B/g, *k]`` <-> ``[B, A/g, *k]``: the two channel axes swapped within each group.

    A transposed kernel ``[C_in, C_out/g]`` becomes the forward layout of the same
    channel maps ``[C_out, C_in/g]``; applied twice it gives the kernel back.
    """
    a, b = weight.shape[:2]
    grouped = weight.reshape((groups, a // groups, b) + tuple(weight.shape[2:])).transpose(1, 2)
    return grouped.reshape((groups * b, a // groups) + tuple(weight.shape[2:]))


@dataclass(frozen=True, eq=False)
class TransposedConvForm:
    """``y = conv_transpose(x, weight [C_in, C_out/g, *k], bias, stride, padding, output_padding, groups, dilation)``."""

    weight: Tensor
    bias: Tensor
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    output_padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    transposed: ClassVar[bool] = True
    is_pointwise: ClassVar[bool] = False  # its output pixels read a stride-spaced grid of input pixels
    is_diagonal: ClassVar[bool] = False
    is_identity: ClassVar[bool] = False

    @property
    def rank(self) -> int:
        return self.weight.dim() - 2

    @property
    def in_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def out_channels(self) -> int:
        return self.weight.shape[1] * self.groups

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    @property
    def geometry(self) -> tuple:
        """Everything that places taps on the output grid: equal geometry, equal grids."""
        return self.kernel_size, self.stride, self.padding, self.output_padding, self.dilation

    def macs(self, out_shape: Sequence[int]) -> int:
        """Each input pixel meets every tap once: output size x (C_in/g) x taps / stride."""
        taps = (self.in_channels // self.groups) * math.prod(self.kernel_size)
        return max(1, math.prod(out_shape) * taps // math.prod(self.stride))

    def describe(self) -> str:
        size = "x".join(map(str, self.kernel_size))
        extra = "" if all(s == 1 for s in self.stride) else f", stride={self.stride}"
        extra += "" if self.groups == 1 else f", groups={self.groups}"
        extra += "" if all(d == 1 for d in self.dilation) else f", dilation={self.dilation}"
        extra += "" if not any(self.output_padding) else f", output_padding={self.output_padding}"
        return f"conv_transpose {size} {self.in_channels}->{self.out_channels}{extra}"

    # -- the proxy: the same channel maps as a forward form ------------------------------
    def _proxy(self) -> ConvForm:
        ones = (1,) * self.rank
        return ConvForm(swap_channel_axes(self.weight, self.groups), self.bias, ones, (0,) * self.rank, ones,
                        self.groups)

    def _with(self, proxy: ConvForm) -> TransposedConvForm:
        return TransposedConvForm(swap_channel_axes(proxy.weight, proxy.groups), proxy.bias, self.stride,
                                  self.padding, self.output_padding, self.dilation, proxy.groups)

    # -- algebra ---------------------------------------------------------------------------
    def then(self, outer: ConvForm) -> TransposedConvForm:
        """``outer(self(x))``: exact when ``outer`` is pointwise and unpadded (BN, a scale, a 1x1 conv)."""
        if outer.transposed or not outer.is_pointwise or any(outer.padding):
            raise NotExact("transposed", f"{outer.describe()} after {self.describe()}: only a per-channel affine or an unpadded "
                           "1x1 convolution folds into a transposed convolution")
        return self._with(compose(outer, self._proxy()))

    def after(self, inner: ConvForm) -> TransposedConvForm:
        """``self(inner(x))``: exact when ``inner`` is pointwise, unpadded and adds no shift."""
        if inner.transposed or not inner.is_pointwise or any(inner.padding):
            raise NotExact("transposed", f"{self.describe()} after {inner.describe()}: only a per-channel scale or an unpadded "
                           "1x1 convolution folds into a transposed convolution that follows it")
        if not negligible(inner.bias):
            raise NotExact("transposed", f"a shift before {self.describe()}: the transposed convolution of a constant is not "
                           "constant near the border (and repeats with the stride), so no single one computes it")
        return self._with(compose(self._proxy(), inner))

    def merge(self, forms: Sequence[ConvForm | TransposedConvForm]) -> TransposedConvForm:
        """Sum of transposed forms of one input with the same geometry: kernels (regrouped to the gcd) add."""
        if not all(form.transposed for form in forms):
            raise NotExact("transposed", "a transposed convolution merges with no forward convolution of the same input")
        if len({form.geometry for form in forms}) != 1:
            raise NotExact("transposed", "transposed convolutions merge only with equal kernel size, stride, padding, "
                           "output_padding and dilation")
        return self._with(merge_parallel([form._proxy() for form in forms]))


def transposed_form(weight: Tensor, bias: Tensor | None, stride: Sequence[int], padding: Sequence[int],
                    output_padding: Sequence[int], dilation: Sequence[int],
                    groups: int) -> ConvForm | TransposedConvForm:
    """The form of a ``conv_transpose`` op: a forward ``ConvForm`` when one is exact (``as_forward``), else transposed."""
    weight = weight.detach().to(torch.float64)
    out_channels = weight.shape[1] * groups
    bias = torch.zeros(out_channels, dtype=torch.float64) if bias is None else bias.detach().to(torch.float64)
    form = TransposedConvForm(weight, bias, tuple(stride), tuple(padding), tuple(output_padding), tuple(dilation),
                              groups)
    return as_forward(form) or form


def as_forward(form: TransposedConvForm) -> ConvForm | None:
    """Stride 1, no output_padding: ``conv_transpose(x, W, p) = conv(x, flip(W'), d*(k-1) - p)``.

    Each output pixel then reads the input pixels its taps reach, in reverse tap
    order; the forward padding must not be negative (a crop is no zero padding).
    """
    reach = [d * (k - 1) - p for k, p, d in zip(form.kernel_size, form.padding, form.dilation)]
    if any(s != 1 for s in form.stride) or any(form.output_padding) or min(reach, default=0) < 0:
        return None
    weight = swap_channel_axes(form.weight, form.groups).flip(list(range(2, form.weight.dim())))
    return ConvForm(weight, form.bias, form.stride, tuple(reach), form.dilation, form.groups)
