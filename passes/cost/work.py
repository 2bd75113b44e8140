"""What a way of computing a region does, op by op: the quantity every cost rule prices.

A ``Work`` is the list of ops one form of a region executes (a merged conv, or the
convs kept apart plus the adds that sum them), each an ``Op`` with what a cost
model needs: multiply-accumulates, elements read and written per sample, weight
elements, and enough of its geometry (``layout``: a ``ConvLayout`` or an
``ElementwiseLayout``) to build it again and time it.
Works add up, so the analyzer prices a region exactly as it priced MACs before:
the work of its terms plus one add per extra term. Rules turn a work into a number
(MACs, modeled seconds, measured seconds); none of them is known here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple


class ConvLayout(NamedTuple):
    """A convolution's (or linear's: no kernel) geometry, per sample."""

    in_shape: tuple[int, ...]  # (C_in, *spatial): the smallest input that yields the output
    out_channels: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    output_padding: tuple[int, ...] | None = None  # a transposed convolution's only


class ElementwiseLayout(NamedTuple):
    """An elementwise op: ``operands`` tensors of ``shape`` read, one written."""

    shape: tuple[int, ...]
    operands: int


@dataclass(frozen=True)
class Op:
    """One executed op, per sample (the batch is the rule's business)."""

    kind: str  # "conv", "conv_transpose", "linear" or "elementwise"
    macs: int  # multiply-accumulates per sample
    reads: int  # activation elements read per sample
    writes: int  # elements written per sample
    params: int  # weight and bias elements, read once per call whatever the batch
    layout: ConvLayout | ElementwiseLayout | tuple = ()  # geometry to rebuild the op (``repfx.targets.timing``)

    def describe(self) -> str:
        layout = self.layout
        if self.kind == "elementwise":
            return f"elementwise x{layout.operands}" if layout else "elementwise"
        size = "x".join(map(str, layout.kernel)) or "linear"
        extra = "" if layout.groups == 1 else f" g{layout.groups}"
        extra += "" if all(s == 1 for s in layout.stride) else f" s{layout.stride[0]}"
        extra += "" if all(d == 1 for d in layout.dilation) else f" d{layout.dilation[0]}"
        transposed = "T" if self.kind == "conv_transpose" else ""
        return f"{size}{transposed} {layout.in_shape[0]}->{layout.out_channels}{extra}"


@dataclass(frozen=True)
class Work:
    """The ops one form of a region executes; adding works concatenates their ops."""

    ops: tuple[Op, ...] = ()

    def __add__(self, other: Work) -> Work:
        return Work(self.ops + other.ops)

    def __radd__(self, other: Any) -> Work:  # ``sum(works)`` starts from 0
        if other == 0:
            return self
        return NotImplemented

    def __mul__(self, times: int) -> Work:  # ``(n - 1) * add``: the adds summing n terms
        return Work(self.ops * times)

    __rmul__ = __mul__

    @property
    def macs(self) -> int:
        return sum(op.macs for op in self.ops)

    @property
    def kernel_params(self) -> int:
        """Weight and bias elements of the convolutions and linears (a BatchNorm's scale and shift fold away)."""
        return sum(op.params for op in self.ops if op.kind != "elementwise")

    def describe(self) -> str:
        """``3x3 16->32 + 1x1 16->32 + elementwise x2``: the ops, for the report."""
        return " + ".join(op.describe() for op in self.ops) or "nothing"


NOTHING = Work()


def elementwise(shape: Sequence[int], operands: int = 2) -> Work:
    """An op that reads ``operands`` tensors of ``shape`` and writes one (an add, a copy into a concat)."""
    numel = math.prod(shape)
    return Work((Op("elementwise", numel, operands * numel, numel, 0, ElementwiseLayout(tuple(shape), operands)),))


def of_form(form: Any, out_shape: Sequence[int]) -> Work:
    """The work of one ``ConvForm`` or ``TransposedConvForm`` producing ``out_shape`` = ``(C, *spatial)``.

    An identity executes nothing; a per-channel scale without padding is an
    elementwise op (a lone BatchNorm), one multiply-accumulate per element. Only
    shapes are read (and a diagonal form's values, to tell an identity): a combined
    form's kernel is computed when first read (``algebra.deferred``), and pricing a
    merge the rule then refuses must not compute it.
    """
    numel = math.prod(out_shape)
    if form.is_identity:
        return NOTHING
    if form.is_diagonal and not any(form.padding):
        return Work((Op("elementwise", numel, numel, numel, 2 * out_shape[0], ElementwiseLayout(tuple(out_shape), 1)),))
    layout = conv_layout(form, out_shape)
    kind = "conv_transpose" if form.transposed else ("linear" if form.rank == 0 else "conv")
    params = form.out_channels * (form.in_channels // form.groups) * math.prod(form.kernel_size) + form.bias.numel()
    return Work((Op(kind, form.macs(out_shape), math.prod(layout.in_shape), numel, params, layout),))


def conv_layout(form: Any, out_shape: Sequence[int]) -> ConvLayout:
    """The geometry of ``form`` producing ``out_shape``.

    The input's spatial size is the smallest that yields ``out_shape`` (a strided
    conv may in truth read up to stride-1 more pixels: immaterial to a cost); a crop's,
    the cropped one.
    """
    kernel, stride, dilation = form.kernel_size, form.stride, form.dilation
    padding = tuple(max(p, 0) for p in form.padding)  # a crop (negative padding) is emitted as a slice, then the conv
    if form.transposed:
        spatial = tuple(max(1, (size + 2 * p - d * (k - 1) - 1 - op) // s + 1) for size, k, s, p, d, op
                        in zip(out_shape[1:], kernel, stride, padding, dilation, form.output_padding))
        output_padding = tuple(form.output_padding)
    else:
        spatial = tuple(max(1, (size - 1) * s - 2 * p + d * (k - 1) + 1) for size, k, s, p, d
                        in zip(out_shape[1:], kernel, stride, padding, dilation))
        output_padding = None
    if form.rank == 0:
        spatial = tuple(out_shape[1:])  # a linear's rows (the leading dims of a channel-last tensor) pass through
    return ConvLayout((form.in_channels, *spatial), form.out_channels, tuple(kernel), tuple(stride), padding,
                      tuple(dilation), form.groups, output_padding)
