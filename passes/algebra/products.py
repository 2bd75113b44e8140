"""The kernel of one form applied after another (``forms.compose``), and the bias it adds.

When one of the two is pointwise, per group the channel maps compose as a matrix
product while the spatial taps come from the other; a per-channel scale or a
depthwise kernel only rescales rows or columns. Two spatial kernels compose into
their full convolution (``spatial``). The kernel is ``Deferred``: a composition is
priced first, and computed only if it is kept.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from repfx.passes.algebra import kernels
from repfx.passes.algebra.deferred import Deferred

if TYPE_CHECKING:  # forms imports this module
    from repfx.passes.algebra.forms import ConvForm


def shifted_bias(outer: ConvForm, shift: Tensor) -> Tensor:
    """``outer``'s bias plus its response to a constant ``shift`` at every input pixel.

    A zero shift (a bias-free conv, most BN-free branches) adds nothing: the sum over
    the whole kernel, which for a wide kxk reads every weight, is skipped.
    """
    if not bool(torch.any(shift)):
        return outer.bias
    return outer.bias + kernels.kernel_response_to_constant(outer.weight, outer.groups, shift)


def channel_maps(outer: ConvForm, inner: ConvForm) -> tuple[Deferred, int]:
    """Kernel (deferred) and groups of ``outer`` after ``inner`` (one of them pointwise).

    Per-channel scales and depthwise kernels take fast paths: they only rescale
    rows or columns (per tap), and expanding them to a dense matrix would cost
    O(C^3 k) for wide layers. Every product is computed in float64: a rescaled
    kernel is upcast (or taken, if deferred) into its result and scaled there, the
    factors of a larger product are upcast first.
    """
    f64 = kernels.float64
    if outer.is_diagonal:  # a per-channel scale, or a crop (its padding is the form's, not the kernel's)
        scale = f64(outer.weight).reshape((-1,) + (1,) * (inner.rank + 1))
        return Deferred(inner.kernel.shape, lambda: inner.fresh_weight().mul_(scale)), inner.groups
    if inner.is_diagonal:
        scale = f64(inner.weight).reshape(-1)
        return Deferred(outer.kernel.shape,
                        lambda: kernels.scale_input_channels(outer.weight, outer.groups, scale)), outer.groups
    if outer.kernel.shape[1] == 1 and inner.is_pointwise:
        shape = (outer.out_channels, inner.kernel.shape[1]) + outer.kernel_size
        return Deferred(shape, lambda: kernels.depthwise_after_pointwise(f64(outer.weight), f64(inner.weight))), \
            inner.groups
    if inner.groups == inner.in_channels == inner.out_channels and outer.is_pointwise:
        shape = (outer.out_channels, outer.kernel.shape[1]) + inner.kernel_size
        return Deferred(shape, lambda: kernels.pointwise_after_depthwise(f64(outer.weight), outer.groups,
                                                                         f64(inner.weight))), outer.groups
    groups = math.gcd(outer.groups, inner.groups)
    spatial = inner.kernel_size if math.prod(outer.kernel_size) == 1 else outer.kernel_size
    shape = (outer.out_channels, inner.in_channels // groups) + spatial
    return Deferred(shape, lambda: kernels.compose_channels(f64(kernels.regroup(outer.weight, outer.groups, groups)),
                                                            f64(kernels.regroup(inner.weight, inner.groups, groups)),
                                                            groups)), groups


def spatial(outer: ConvForm, inner: ConvForm) -> tuple[Deferred, int, tuple[int, ...]]:
    """Kernel (deferred), groups and dilation of two spatial kernels in a row: their full convolution.

    Per dim, outer tap ``u`` and inner tap ``t`` read the input pixel
    ``si * (so * q - po + do * u) - pi + di * t`` for output ``q`` (``forms.compose`` takes
    the stride ``si * so`` and padding ``si * po + pi`` from this): taps every ``si * do``
    and ``di`` pixels, written on a grid of their gcd, the merged dilation (a dim where one
    kernel has one tap takes the other's spacing). Both kernels are regrouped to the gcd of
    their groups (a group of the composition reads the inner groups inside it).
    """
    dilation, outer_steps, inner_steps = [], [], []
    for ko, ki, si, do, di in zip(outer.kernel_size, inner.kernel_size, inner.stride, outer.dilation, inner.dilation):
        step = si * do if ki == 1 else di if ko == 1 else math.gcd(si * do, di)
        dilation.append(step)
        outer_steps.append(si * do // step if ko > 1 else 1)
        inner_steps.append(di // step if ki > 1 else 1)
    f64 = kernels.float64
    groups = math.gcd(outer.groups, inner.groups)
    size = tuple((ko - 1) * a + (ki - 1) * b + 1
                 for ko, ki, a, b in zip(outer.kernel_size, inner.kernel_size, outer_steps, inner_steps))
    shape = (outer.out_channels, inner.in_channels // groups) + size
    return Deferred(shape, lambda: kernels.compose_spatial(f64(kernels.regroup(outer.weight, outer.groups, groups)),
                                                           f64(kernels.regroup(inner.weight, inner.groups, groups)),
                                                           groups, outer_steps, inner_steps)), groups, tuple(dilation)
