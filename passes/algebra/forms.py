"""``ConvForm``: an affine operator written as one zero-padded convolution, and its algebra.

Every op a linear region can hold (convolution, eval BatchNorm, identity, scalar or
per-channel scale/shift, average pooling, zero padding, linear) is a ``ConvForm``
of the tensor it reads. Regions collapse by combining forms:

* ``merge_parallel``: sum of forms of the same input (RepVGG, ACB, DBB branches);
* ``stack_outputs``: channel concat of forms of the same input;
* ``compose``: one form applied to the output of another (conv->BN, 1x1->kxk, 1xk->kx1, ...).

Each combination either returns an exactly equivalent form or raises ``NotExact``
with a sentence saying why; the caller records it. Forms hold exact values: what
they compute is float64, so that long chains stay exact, and a convolution's own
weight is the stored parameter (any float dtype converts to float64 exactly), upcast
by the first product that reads it rather than copied up front, since a lone conv,
and every conv of a later round, is never computed with. Emission casts back to the
model dtype once.
No torch.fx here: the graph side lives in ``regions`` and ``emit``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property, reduce
from typing import ClassVar

import torch
from torch import Tensor

from repfx.passes.algebra import grid, kernels, products
from repfx.passes.algebra.deferred import Deferred
from repfx.passes.refusals import NotExact


# Shifts that cancel (DBB pads with ``bias - mean * scale`` computed by the model in
# fp32, the fold recomputes it in fp64) differ by rounding; below this relative size
# they count as equal. Verification still measures the end result.
NEGLIGIBLE = 1e-6


def negligible(values: Tensor, reference: Tensor | None = None) -> bool:
    """True when ``values`` are zero up to rounding of numbers as large as ``reference``."""
    scale = 1.0 if reference is None or not reference.numel() else max(1.0, reference.abs().max().item())
    return not values.numel() or values.abs().max().item() <= NEGLIGIBLE * scale


@dataclass(frozen=True, eq=False)
class ConvForm:
    """``y = conv(x, weight, bias, stride, padding, dilation, groups)`` with zero padding.

    Rank 0 (weight ``[C_out, C_in/groups]``) is a linear layer on ``[N, C]`` inputs.
    ``kernel`` is float64 or a stored parameter (exact either way, see the module docstring),
    or, for a combination, a ``Deferred`` one; ``weight`` reads its values.
    """

    kernel: Tensor | Deferred
    bias: Tensor
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    transposed: ClassVar[bool] = False  # ``transposed.TransposedConvForm`` says True and brings its own algebra

    # -- constructors -------------------------------------------------------------
    @classmethod
    def convolution(
        cls,
        weight: Tensor,
        bias: Tensor | None,
        stride: Sequence[int],
        padding: Sequence[int],
        dilation: Sequence[int],
        groups: int,
    ) -> ConvForm:
        weight = weight.detach()  # kept as stored: upcast by the first product that reads it
        bias = torch.zeros(weight.shape[0], dtype=torch.float64) if bias is None else bias.detach().to(torch.float64)
        return cls(weight, bias, tuple(stride), tuple(padding), tuple(dilation), groups)

    @classmethod
    def affine(cls, scale: Tensor, shift: Tensor, rank: int) -> ConvForm:
        """Per-channel ``scale * x + shift`` as a depthwise 1x..x1 convolution."""
        scale = scale.detach().to(torch.float64)
        ones = (1,) * rank
        return cls(kernels.diagonal_kernel(scale, rank), shift.detach().to(torch.float64).clone(),
                   ones, (0,) * rank, ones, scale.numel())

    @classmethod
    def identity(cls, channels: int, rank: int) -> ConvForm:
        return cls.affine(torch.ones(channels, dtype=torch.float64), torch.zeros(channels, dtype=torch.float64), rank)

    @classmethod
    def zero_pad(cls, channels: int, padding: Sequence[int]) -> ConvForm:
        """Symmetric zero padding: a 1x..x1 identity convolution with that padding."""
        identity = cls.identity(channels, len(padding))
        return cls(identity.weight, identity.bias, identity.stride, tuple(padding), identity.dilation, channels)

    # -- properties ---------------------------------------------------------------
    @property
    def weight(self) -> Tensor:
        """The kernel's values (a deferred kernel is computed here, once)."""
        return self.kernel.value() if isinstance(self.kernel, Deferred) else self.kernel

    def fresh_weight(self) -> Tensor:
        """The kernel in float64 as a new contiguous tensor the caller owns (to add others into)."""
        if not isinstance(self.kernel, Deferred):
            return self.kernel.to(torch.float64, memory_format=torch.contiguous_format, copy=True)
        value = self.kernel.fresh()
        if value.dtype == torch.float64 and value.is_contiguous():
            return value
        return value.to(torch.float64, memory_format=torch.contiguous_format)

    @property
    def rank(self) -> int:
        return len(self.kernel.shape) - 2

    @property
    def in_channels(self) -> int:
        return self.kernel.shape[1] * self.groups

    @property
    def out_channels(self) -> int:
        return self.kernel.shape[0]

    # A form never changes (its tensors are never written: combinations build new ones), so what it
    # is is worked out once: pricing asks each form these several times, and ``is_identity`` reads values.
    @cached_property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(self.kernel.shape[2:])

    @cached_property
    def is_pointwise(self) -> bool:
        """1x..x1 kernel with stride 1: each output pixel reads only its own input pixel."""
        return all(k == 1 for k in self.kernel_size) and all(s == 1 for s in self.stride)

    @cached_property
    def is_diagonal(self) -> bool:
        """Per-channel scale (and shift), possibly with padding: a depthwise pointwise form."""
        return self.is_pointwise and self.groups == self.in_channels == self.out_channels

    @cached_property
    def is_identity(self) -> bool:
        return (self.is_diagonal and not any(self.padding)
                and bool(torch.all(self.weight == 1)) and not bool(torch.any(self.bias)))

    @property
    def alignment(self) -> tuple[int, ...]:
        """Per dim ``2*padding - (k-1)*dilation``; forms with equal alignment and stride
        produce the same output grid for every input size, so their taps line up."""
        return tuple(2 * p - (k - 1) * d for p, k, d in zip(self.padding, self.kernel_size, self.dilation))

    def macs(self, out_shape: Sequence[int]) -> int:
        """Multiply-accumulates per sample to produce ``out_shape`` = ``(C, *spatial)``.

        A per-channel scale costs one operation per output element; an identity none.
        """
        numel = math.prod(out_shape)
        if self.is_identity:
            return 0
        if self.is_diagonal and not any(self.padding):
            return numel
        return numel * self.kernel.shape[1] * math.prod(self.kernel_size)

    def describe(self) -> str:
        if self.rank == 0:
            return f"linear {self.in_channels}->{self.out_channels}"
        size = "x".join(map(str, self.kernel_size))
        extra = "" if self.groups == 1 else f", groups={self.groups}"
        if any(d > 1 for d in self.dilation):
            extra += f", dilation={self.dilation}"
        return f"conv {size} {self.in_channels}->{self.out_channels}{extra}"


# -- combinations -----------------------------------------------------------------

def _check_same_input(forms: Sequence[ConvForm]) -> None:
    if any(form.transposed for form in forms):
        raise NotExact("transposed", "a transposed convolution stacks with no other branch of its input")
    first = forms[0]
    for form in forms[1:]:
        if form.rank != first.rank:
            raise NotExact("rank", f"branches have different spatial rank ({first.rank} vs {form.rank})")
        if form.in_channels != first.in_channels:
            raise NotExact("channels", f"branches read different channel counts ({first.in_channels} vs {form.in_channels})")
        if form.stride != first.stride:
            raise NotExact("stride", f"branches have different strides {first.stride} vs {form.stride}")
        if form.alignment != first.alignment:
            raise NotExact(
                "alignment", f"branch centres are misaligned (2*padding-(k-1)*dilation = {first.alignment} vs {form.alignment})")


def merge_parallel(forms: Sequence[ConvForm]) -> ConvForm:
    """Sum of forms reading the same tensor: conv is linear in its kernel, so kernels add.

    Exact when strides and alignments agree (same output grid); differing groups
    are reconciled by regrouping to their gcd, kernel sizes by zero taps. The sum is
    one new kernel (deferred): the first branch's, when it spans the grid, with the
    others added into it, in order, where their taps land.
    """
    transposed = [form for form in forms if form.transposed]
    if transposed:  # a transposed form knows when its kernels add (``transposed.TransposedConvForm.merge``)
        return transposed[0].merge(forms)
    _check_same_input(forms)
    out_channels = {form.out_channels for form in forms}
    if len(out_channels) != 1:
        raise NotExact("channels", f"branches produce different channel counts {sorted(out_channels)}")
    groups = reduce(math.gcd, (form.groups for form in forms))
    size, padding, dilation, placements = grid.common_grid(forms)
    first = forms[0]
    shape = (first.out_channels, first.in_channels // groups) + size

    def summed() -> Tensor:
        if grid.fills_grid(first, groups, size, placements[0]):
            weight, rest = first.fresh_weight(), 1
        else:
            weight, rest = torch.zeros(shape, dtype=torch.float64), 0
        for form, placement in zip(forms[rest:], placements[rest:]):
            kernels.add_placed(weight, form.weight, form.groups, groups, *placement)
        return weight

    bias = first.bias.clone()
    for form in forms[1:]:
        bias += form.bias
    return ConvForm(Deferred(shape, summed), bias, first.stride, padding, dilation, groups)


def stack_outputs(forms: Sequence[ConvForm]) -> ConvForm:
    """Channel concat of forms reading the same tensor: one conv with stacked kernels.

    The stacked kernel is written densely (groups=1): the outputs of grouped forms
    interleave differently once concatenated, and the cost rule decides if that pays.
    """
    _check_same_input(forms)
    size, padding, dilation, placements = grid.common_grid(forms)
    rows = [form.out_channels for form in forms]
    shape = (sum(rows), forms[0].in_channels) + size

    def stacked() -> Tensor:
        weight = torch.zeros(shape, dtype=torch.float64)
        for block, form, placement in zip(weight.split(rows), forms, placements):
            kernels.add_placed(block, form.weight, form.groups, 1, *placement)
        return weight

    bias = torch.cat([form.bias for form in forms])
    return ConvForm(Deferred(shape, stacked), bias, forms[0].stride, padding, dilation, 1)


def compose(outer: ConvForm, inner: ConvForm) -> ConvForm:
    """``outer(inner(x))`` as one form, when that is exact.

    Border rule: a zero-padding ``outer`` reads zeros around ``inner``'s output, but a
    merged conv would read what ``inner`` computes there. So where ``outer`` pads, ``inner``'s
    output just outside its border must read only zero padding (a pointwise op, or a
    kernel padded by its full reach) and ``inner`` must add no shift (``_check_border``).
    Two spatial kernels become their full convolution (the kernel grows: whether that
    pays is the cost rule's question). A transposed form composes by its own rules
    (``then``: ops after it, ``after``: ops before it).
    """
    if inner.transposed:
        return inner.then(outer)
    if outer.transposed:
        return outer.after(inner)
    if inner.out_channels != outer.in_channels or inner.rank != outer.rank:
        raise NotExact("channels", f"channel mismatch: {inner.out_channels} channels into an op expecting {outer.in_channels}")
    if inner.is_identity:
        return outer  # what the general rule computes (times ones, plus a zero shift), without copying the kernel
    _check_border(outer, inner)
    bias = products.shifted_bias(outer, inner.bias)
    padding = tuple(si * po + pi for si, po, pi in zip(inner.stride, outer.padding, inner.padding))
    if inner.is_pointwise:
        weight, groups = products.channel_maps(outer, inner)
        return ConvForm(weight, bias, outer.stride, padding, outer.dilation, groups)
    if outer.is_pointwise:
        weight, groups = products.channel_maps(outer, inner)
        return ConvForm(weight, bias, inner.stride, padding, inner.dilation, groups)
    weight, groups, dilation = products.spatial(outer, inner)  # both spatial: their full convolution
    stride = tuple(si * so for si, so in zip(inner.stride, outer.stride))
    return ConvForm(weight, bias, stride, padding, dilation, groups)


def _check_border(outer: ConvForm, inner: ConvForm) -> None:
    """Raise where ``outer``'s zero padding would not read zeros in one merged conv (see ``compose``).

    Per dim, ``inner``'s output just outside its border reads input pixels up to
    ``dilation * (k - 1) - padding`` inside the input: real pixels unless that is
    negative or zero (a pointwise op, a kernel padded by its full reach). A crop
    (negative padding) there reads pixels the original cropped away. A crop by ``outer``
    reads fewer of ``inner``'s outputs, which is always exact.
    """
    pads = [po > 0 for po in outer.padding]
    reach = [d * (k - 1) - p for k, p, d in zip(inner.kernel_size, inner.padding, inner.dilation)]
    if any(pad and p < 0 for pad, p in zip(pads, inner.padding)):
        raise NotExact("border", "the outer op zero-pads a crop; a single convolution would read the cropped "
                       "pixels there instead of zeros")
    if any(pad and r > 0 for pad, r in zip(pads, reach)):
        raise NotExact("border", "the outer op pads the output of a spatial convolution; "
                       "a single convolution would read real pixels there instead of zeros")
    if any(pads) and not negligible(inner.bias):
        raise NotExact("border", "border rule: the inner op adds a non-zero shift and the outer op zero-pads, "
                       "so one zero-padded conv would see the shift where the original sees zeros")


def pad_output(form: ConvForm, padding: Sequence[int], value: Tensor | None = None) -> ConvForm:
    """``pad(form(x))`` with a per-channel constant ``value`` (zeros when None).

    Only a pointwise form can absorb padding: its padded output equals the form
    applied to a padded input, provided the border value equals the form's
    output on a zero pixel, which is its bias (DBB's BN-and-pad layer relies on this).
    """
    if not form.is_pointwise:
        raise NotExact("border", "padding the output of a spatial convolution: border pixels would differ")
    if any(q > 0 and p < 0 for p, q in zip(form.padding, padding)):
        raise NotExact("border", "padding a crop: the border would hold zeros where one conv reads the cropped pixels")
    border = torch.zeros_like(form.bias) if value is None else value.to(torch.float64).expand_as(form.bias)
    if not negligible(border - form.bias, border):
        raise NotExact("border", "the pad value differs from the padded op's output on zeros (its shift), "
                       "so the border is not what a padded convolution produces")
    total = tuple(p + q for p, q in zip(form.padding, padding))
    return ConvForm(form.kernel, form.bias, form.stride, total, form.dilation, form.groups)


def pointwise_at_rank(form: ConvForm, rank: int) -> ConvForm:
    """A pointwise, unpadded ``form`` written for tensors of another spatial rank.

    Such a form mixes channels pixel by pixel, whatever the pixels are; so it is the
    same operator on ``[N, C]`` rows (rank 0, the channel last), on ``[N, C, L]``
    or on ``[N, C, H, W]``: only the kernel's trailing 1s change. This is what lets
    a per-channel op between two transposes act on the untransposed tensor.
    """
    if not form.is_pointwise or any(form.padding):
        raise NotExact("permute", f"{form.describe()} reads neighbouring pixels; it does not commute with a transpose")
    weight = form.weight.reshape(tuple(form.weight.shape[:2]) + (1,) * rank)
    ones = (1,) * rank
    return ConvForm(weight, form.bias, ones, (0,) * rank, ones, form.groups)
