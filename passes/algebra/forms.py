"""``ConvForm``: an affine operator written as one zero-padded convolution, and its algebra.

Every op a linear region can hold (convolution, eval BatchNorm, identity, scalar or
per-channel scale/shift, average pooling, zero padding, linear) is a ``ConvForm``
of the tensor it reads. Regions collapse by combining forms:

* ``merge_parallel``: sum of forms of the same input (RepVGG, ACB, DBB branches);
* ``stack_outputs``: channel concat of forms of the same input;
* ``compose``: one form applied to the output of another (conv->BN, 1x1->kxk, ...).

Each combination either returns an exactly equivalent form or raises ``NotExact``
with a sentence saying why; the caller records it. Forms hold float64 tensors so
that long chains stay exact; emission casts back to the model dtype once.
No torch.fx here: the graph side lives in ``regions`` and ``emit``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import reduce
from typing import ClassVar

import torch
from torch import Tensor

from repfx.passes.algebra import kernels


# Shifts that cancel (DBB pads with ``bias - mean * scale`` computed by the model in
# fp32, the fold recomputes it in fp64) differ by rounding; below this relative size
# they count as equal. Verification still measures the end result.
NEGLIGIBLE = 1e-6


def negligible(values: Tensor, reference: Tensor | None = None) -> bool:
    """True when ``values`` are zero up to rounding of numbers as large as ``reference``."""
    scale = 1.0 if reference is None or not reference.numel() else max(1.0, reference.abs().max().item())
    return not values.numel() or values.abs().max().item() <= NEGLIGIBLE * scale


class NotExact(Exception):
    """A combination of forms would not compute the same function (or not cheaper); ``str`` says why."""


@dataclass(frozen=True, eq=False)
class ConvForm:
    """``y = conv(x, weight, bias, stride, padding, dilation, groups)`` with zero padding.

    Rank 0 (weight ``[C_out, C_in/groups]``) is a linear layer on ``[N, C]`` inputs.
    """

    weight: Tensor
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
        weight = weight.detach().to(torch.float64)
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
    def rank(self) -> int:
        return self.weight.dim() - 2

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.groups

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    @property
    def is_pointwise(self) -> bool:
        """1x..x1 kernel with stride 1: each output pixel reads only its own input pixel."""
        return all(k == 1 for k in self.kernel_size) and all(s == 1 for s in self.stride)

    @property
    def is_diagonal(self) -> bool:
        """Per-channel scale (and shift), possibly with padding: a depthwise pointwise form."""
        return self.is_pointwise and self.groups == self.in_channels == self.out_channels

    @property
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
        return numel * self.weight.shape[1] * math.prod(self.kernel_size)

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
        raise NotExact("a transposed convolution stacks with no other branch of its input")
    first = forms[0]
    for form in forms[1:]:
        if form.rank != first.rank:
            raise NotExact(f"branches have different spatial rank ({first.rank} vs {form.rank})")
        if form.in_channels != first.in_channels:
            raise NotExact(f"branches read different channel counts ({first.in_channels} vs {form.in_channels})")
        if form.stride != first.stride:
            raise NotExact(f"branches have different strides {first.stride} vs {form.stride}")
        if form.alignment != first.alignment:
            raise NotExact(
                f"branch centres are misaligned (2*padding-(k-1)*dilation = {first.alignment} vs {form.alignment})")


def _aligned_weights(forms: Sequence[ConvForm], groups: int) -> tuple[list[Tensor], tuple[int, ...], tuple[int, ...]]:
    """Write every form's kernel on one common tap grid with ``groups`` groups.

    The grid spans offsets ``[-P, P - alignment]`` around each output's anchor, where
    P is the largest padding; its step (the merged dilation) is the largest that
    still hits every tap of every form, so a dilated kernel stays dilated.
    """
    rank = forms[0].rank
    padding, dilation, size = [], [], []
    placements: list[list[tuple[int, int]]] = [[] for _ in forms]
    for dim in range(rank):
        pad = max(form.padding[dim] for form in forms)
        extent = 2 * pad - forms[0].alignment[dim]
        spacings = [extent] + [pad - form.padding[dim] for form in forms]
        spacings += [form.dilation[dim] for form in forms if form.kernel_size[dim] > 1]
        step = reduce(math.gcd, spacings) or 1
        padding.append(pad)
        dilation.append(step)
        size.append(extent // step + 1)
        for placement, form in zip(placements, forms):
            tap_step = form.dilation[dim] // step if form.kernel_size[dim] > 1 else 1
            placement.append(((pad - form.padding[dim]) // step, tap_step))
    weights = []
    for form, placement in zip(forms, placements):
        weight = kernels.regroup(form.weight, form.groups, groups)
        if rank:
            offsets, steps = zip(*placement)
            weight = kernels.place_kernel(weight, size, offsets, steps)
        weights.append(weight)
    return weights, tuple(padding), tuple(dilation)


def merge_parallel(forms: Sequence[ConvForm]) -> ConvForm:
    """Sum of forms reading the same tensor: conv is linear in its kernel, so kernels add.

    Exact when strides and alignments agree (same output grid); differing groups
    are reconciled by regrouping to their gcd, kernel sizes by zero taps.
    """
    transposed = [form for form in forms if form.transposed]
    if transposed:  # a transposed form knows when its kernels add (``transposed.TransposedConvForm.merge``)
        return transposed[0].merge(forms)
    _check_same_input(forms)
    out_channels = {form.out_channels for form in forms}
    if len(out_channels) != 1:
        raise NotExact(f"branches produce different channel counts {sorted(out_channels)}")
    groups = reduce(math.gcd, (form.groups for form in forms))
    weights, padding, dilation = _aligned_weights(forms, groups)
    weight, bias = weights[0].clone(), forms[0].bias.clone()
    for other, form in zip(weights[1:], forms[1:]):
        weight += other
        bias += form.bias
    return ConvForm(weight, bias, forms[0].stride, padding, dilation, groups)


def stack_outputs(forms: Sequence[ConvForm]) -> ConvForm:
    """Channel concat of forms reading the same tensor: one conv with stacked kernels.

    The stacked kernel is written densely (groups=1): the outputs of grouped forms
    interleave differently once concatenated, and the cost rule decides if that pays.
    """
    _check_same_input(forms)
    weights, padding, dilation = _aligned_weights(forms, 1)
    bias = torch.cat([form.bias for form in forms])
    return ConvForm(torch.cat(weights), bias, forms[0].stride, padding, dilation, 1)


def compose(outer: ConvForm, inner: ConvForm) -> ConvForm:
    """``outer(inner(x))`` as one form, when that is exact.

    Border rule: a zero-padding ``outer`` reads zeros around ``inner``'s output, but a
    merged conv would read ``inner``'s bias there. So when ``outer`` pads, ``inner``
    must be pointwise (so its padded output is itself a padded input) and bias-free.
    Two spatial kernels in a row are not merged (the kernel would grow). A transposed
    form composes by its own rules (``then``: ops after it, ``after``: ops before it).
    """
    if inner.transposed:
        return inner.then(outer)
    if outer.transposed:
        return outer.after(inner)
    if inner.out_channels != outer.in_channels or inner.rank != outer.rank:
        raise NotExact(f"channel mismatch: {inner.out_channels} channels into an op expecting {outer.in_channels}")
    if inner.is_pointwise:
        if any(outer.padding) and not negligible(inner.bias):
            raise NotExact("border rule: the inner op adds a non-zero shift and the outer op zero-pads, "
                           "so one zero-padded conv would see the shift where the original sees zeros")
        weight, groups = _compose_channel_maps(outer, inner)
        bias = outer.bias + kernels.kernel_response_to_constant(outer.weight, outer.groups, inner.bias)
        padding = tuple(po + pi for po, pi in zip(outer.padding, inner.padding))
        return ConvForm(weight, bias, outer.stride, padding, outer.dilation, groups)
    if outer.is_pointwise:
        if any(outer.padding):
            raise NotExact("the outer op pads the output of a spatial convolution; "
                           "a single convolution would read real pixels there instead of zeros")
        weight, groups = _compose_channel_maps(outer, inner)
        bias = outer.bias + kernels.kernel_response_to_constant(outer.weight, outer.groups, inner.bias)
        return ConvForm(weight, bias, inner.stride, inner.padding, inner.dilation, groups)
    raise NotExact(f"{outer.describe()} after {inner.describe()}: composing two spatial kernels "
                   "grows the kernel; not merged")


def _compose_channel_maps(outer: ConvForm, inner: ConvForm) -> tuple[Tensor, int]:
    """Kernel and groups of ``outer`` after ``inner`` (one of them pointwise).

    Per-channel scales and depthwise kernels take fast paths: they only rescale
    rows or columns (per tap), and expanding them to a dense matrix would cost
    O(C^3 k) for wide layers.
    """
    if outer.is_diagonal and not any(outer.padding):
        scale = outer.weight.reshape((-1,) + (1,) * (inner.weight.dim() - 1))
        return scale * inner.weight, inner.groups
    if inner.is_diagonal:
        return kernels.scale_input_channels(outer.weight, outer.groups, inner.weight.reshape(-1)), outer.groups
    if outer.weight.shape[1] == 1 and inner.is_pointwise:
        return kernels.depthwise_after_pointwise(outer.weight, inner.weight), inner.groups
    if inner.groups == inner.in_channels == inner.out_channels and outer.is_pointwise:
        return kernels.pointwise_after_depthwise(outer.weight, outer.groups, inner.weight), outer.groups
    groups = math.gcd(outer.groups, inner.groups)
    outer_w = kernels.regroup(outer.weight, outer.groups, groups)
    inner_w = kernels.regroup(inner.weight, inner.groups, groups)
    return kernels.compose_channels(outer_w, inner_w, groups), groups


def pad_output(form: ConvForm, padding: Sequence[int], value: Tensor | None = None) -> ConvForm:
    """``pad(form(x))`` with a per-channel constant ``value`` (zeros when None).

    Only a pointwise form can absorb padding: its padded output equals the form
    applied to a padded input, provided the border value equals the form's
    output on a zero pixel, which is its bias (DBB's BN-and-pad layer relies on this).
    """
    if not form.is_pointwise:
        raise NotExact("padding the output of a spatial convolution: border pixels would differ")
    border = torch.zeros_like(form.bias) if value is None else value.to(torch.float64).expand_as(form.bias)
    if not negligible(border - form.bias, border):
        raise NotExact("the pad value differs from the padded op's output on zeros (its shift), "
                       "so the border is not what a padded convolution produces")
    total = tuple(p + q for p, q in zip(form.padding, padding))
    return ConvForm(form.weight, form.bias, form.stride, total, form.dilation, form.groups)


def pointwise_at_rank(form: ConvForm, rank: int) -> ConvForm:
    """A pointwise, unpadded ``form`` written for tensors of another spatial rank.

    Such a form mixes channels pixel by pixel, whatever the pixels are; so it is the
    same operator on ``[N, C]`` rows (rank 0, the channel last), on ``[N, C, L]``
    or on ``[N, C, H, W]``: only the kernel's trailing 1s change. This is what lets
    a per-channel op between two transposes act on the untransposed tensor.
    """
    if not form.is_pointwise or any(form.padding):
        raise NotExact(f"{form.describe()} reads neighbouring pixels; it does not commute with a transpose")
    weight = form.weight.reshape(tuple(form.weight.shape[:2]) + (1,) * rank)
    ones = (1,) * rank
    return ConvForm(weight, form.bias, ones, (0,) * rank, ones, form.groups)
