"""Kernel algebra: pure tensor functions behind every re-parameterization.

Nothing here knows about graphs. Every function takes and returns plain tensors
(callers pass float64 so that folding chains stay exact to ~1e-15; where one factor
of a product is float64 the other may be a stored parameter, which the product
upcasts exactly) and states the identity it relies on, so the graph passes stay thin
and these can be tested alone.

Weight layout is PyTorch's: ``[C_out, C_in / groups, *kernel]``. A rank-0 weight
``[C_out, C_in]`` is a linear layer, which is a convolution with no spatial dims.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor


def batch_norm_scale_shift(
    running_mean: Tensor, running_var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    """Eval-mode BatchNorm as ``y = scale * x + shift`` per channel.

    bn(x) = (x - mean) / sqrt(var + eps) * gamma + beta, so
    scale = gamma / sqrt(var + eps) and shift = beta - mean * scale.
    """
    scale = torch.rsqrt(running_var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -running_mean * scale
    if bias is not None:
        shift = shift + bias
    return scale, shift


def float64(tensor: Tensor) -> Tensor:
    """``tensor`` in float64: itself when it already is, else an exact upcast copy."""
    return tensor if tensor.dtype == torch.float64 else tensor.to(torch.float64)


def scaled(weight: Tensor, factor: Tensor) -> Tensor:
    """``weight * factor`` in float64 (``factor`` float64, broadcasting to ``weight``'s shape), one new tensor.

    A stored parameter is upcast into the result and scaled there: a product of mixed
    dtypes casts element by element, slower than the copy it saves.
    """
    if weight.dtype == torch.float64:
        return weight * factor
    return weight.to(torch.float64).mul_(factor)


def identity_kernel(channels: int, rank: int, *, dtype: torch.dtype = torch.float64) -> Tensor:
    """Depthwise (groups == channels) 1x..x1 kernel of ones: conv with it is the identity."""
    return torch.ones((channels, 1) + (1,) * rank, dtype=dtype)


def diagonal_kernel(scale: Tensor, rank: int) -> Tensor:
    """Depthwise 1x..x1 kernel that multiplies channel ``c`` by ``scale[c]``."""
    return scale.reshape((-1, 1) + (1,) * rank).clone()


def avgpool_kernel(channels: int, kernel_size: Sequence[int], *, dtype: torch.dtype = torch.float64) -> Tensor:
    """Depthwise kernel equal to average pooling with ``count_include_pad=True``.

    Such a pool divides every window by prod(kernel_size), zero padding included,
    which is exactly a depthwise convolution with a constant kernel.
    """
    size = tuple(kernel_size)
    return torch.full((channels, 1) + size, 1.0 / math.prod(size), dtype=dtype)


def regroup(weight: Tensor, groups: int, new_groups: int) -> Tensor:
    """Re-express a grouped kernel with fewer groups (``new_groups`` divides ``groups``).

    A grouped convolution is a dense one whose kernel is block diagonal over
    contiguous channel blocks. Every block of the finer partition lies inside one
    block of the coarser partition, so the kernel is copied into the coarser
    block-diagonal layout with zeros elsewhere: the result is the same operator.
    """
    if groups == new_groups:
        return weight
    if groups % new_groups:
        raise ValueError(f"cannot regroup {groups} groups into {new_groups}: not a divisor")
    out_channels, in_per_group = weight.shape[:2]
    ratio = groups // new_groups
    out_per_group = out_channels // groups
    result = weight.new_zeros((out_channels, in_per_group * ratio) + tuple(weight.shape[2:]))
    for group in range(groups):
        rows = slice(group * out_per_group, (group + 1) * out_per_group)
        offset = (group % ratio) * in_per_group
        result[rows, offset : offset + in_per_group] = weight[rows]
    return result


def place_kernel(weight: Tensor, size: Sequence[int], offsets: Sequence[int], steps: Sequence[int]) -> Tensor:
    """Scatter ``weight``'s taps into a larger zero kernel.

    Tap ``j`` along spatial dim ``d`` lands at ``offsets[d] + j * steps[d]``; this is
    how a 1x1 is padded to kxk (offset k//2, step 1) and how a dilated kernel is
    written densely (step = its dilation / the target dilation).
    """
    result = weight.new_zeros(tuple(weight.shape[:2]) + tuple(size))
    index = [slice(None), slice(None)]
    for length, offset, step in zip(weight.shape[2:], offsets, steps):
        index.append(slice(offset, offset + (length - 1) * step + 1, step))
    result[tuple(index)] = weight
    return result


def add_placed(target: Tensor, weight: Tensor, groups: int, target_groups: int,
               offsets: Sequence[int], steps: Sequence[int]) -> None:
    """``target += place_kernel(regroup(weight, groups, target_groups), ...)``, in place.

    Neither the regrouped nor the placed kernel is built: they are ``weight`` with
    zeros around it, and adding zeros leaves ``target`` as it is, so only the taps
    ``weight`` lands on are touched. Merging a 1x1 or an identity branch into a wide
    kxk kernel thus costs the small kernel's size, not two copies of the large one.
    A regrouped kernel is block diagonal: seen as ``[g', r, o, r, i, *k]`` (``r``
    fine groups per coarse one), ``weight``'s blocks are its ``r == r`` diagonal.
    ``target`` (``[C_out, C_in / target_groups, *size]``) must be contiguous.
    """
    if groups % target_groups:
        raise ValueError(f"cannot regroup {groups} groups into {target_groups}: not a divisor")
    ratio = groups // target_groups
    out_per_group, in_per_group = weight.shape[0] // groups, weight.shape[1]
    taps = tuple(slice(offset, offset + (length - 1) * step + 1, step)
                 for length, offset, step in zip(weight.shape[2:], offsets, steps))
    blocks = target.view((target_groups, ratio, out_per_group, ratio, in_per_group) + tuple(target.shape[2:]))
    diagonal = blocks.diagonal(dim1=1, dim2=3)  # [g', o, i, *size, r]: fine group r's rows read its own columns
    source = weight.reshape((target_groups, ratio, out_per_group, in_per_group) + tuple(weight.shape[2:]))
    diagonal[(slice(None),) * 3 + taps].add_(source.movedim(1, -1))


def grouped_view(weight: Tensor, groups: int) -> Tensor:
    """``[C_out, C_in/g, *k]`` viewed as ``[g, C_out/g, C_in/g, *k]``."""
    return weight.reshape((groups, weight.shape[0] // groups) + tuple(weight.shape[1:]))


def _taps_last(grouped: Tensor) -> Tensor:
    """``[g, o, i, *k]`` -> ``[g, o, i, prod(k)]`` (a rank-0 kernel has one tap)."""
    return grouped.reshape(tuple(grouped.shape[:3]) + (-1,))


def compose_channels(outer: Tensor, inner: Tensor, groups: int) -> Tensor:
    """Kernel of ``outer(inner(x))`` where one of the two is pointwise (1x..x1).

    Both kernels must already share ``groups``. Per group the channel maps compose
    as a matrix product; the spatial taps come from whichever kernel has them
    (the pointwise one contributes a single tap).
    """
    outer_g = _taps_last(grouped_view(outer, groups))  # g, o, m, k_outer
    inner_g = _taps_last(grouped_view(inner, groups))  # g, m, i, k_inner
    if outer_g.shape[-1] == 1:
        taps = torch.einsum("gom,gmik->goik", outer_g[..., 0], inner_g)
        spatial = inner.shape[2:]
    else:
        taps = torch.einsum("gomk,gmi->goik", outer_g, inner_g[..., 0])
        spatial = outer.shape[2:]
    return taps.reshape((outer.shape[0], inner.shape[1]) + tuple(spatial))


def compose_spatial(outer: Tensor, inner: Tensor, groups: int,
                    outer_steps: Sequence[int], inner_steps: Sequence[int]) -> Tensor:
    """Kernel of ``outer(inner(x))`` for two spatial kernels sharing ``groups``: their full convolution.

    Outer tap ``u`` reads the inner output that inner tap ``t`` computed from the input
    pixel ``u * outer_steps + t * inner_steps`` taps away (steps on the merged tap grid:
    ``forms.compose`` works them out from strides and dilations), so each pair of taps
    adds the product of their channel maps there. A 1xk after a kx1 is one kxk.
    """
    outer_g, inner_g = grouped_view(outer, groups), grouped_view(inner, groups)  # g, o, m, *ko / g, m, i, *ki
    inner_size = inner.shape[2:]
    size = tuple((ko - 1) * a + (ki - 1) * b + 1
                 for ko, ki, a, b in zip(outer.shape[2:], inner_size, outer_steps, inner_steps))
    result = inner.new_zeros(tuple(outer_g.shape[:2]) + (inner.shape[1],) + size)
    for tap in itertools.product(*(range(k) for k in outer.shape[2:])):
        window = tuple(slice(u * a, u * a + (ki - 1) * b + 1, b)
                       for u, ki, a, b in zip(tap, inner_size, outer_steps, inner_steps))
        result[(slice(None),) * 3 + window] += torch.einsum("gom,gmi...->goi...", outer_g[(...,) + tap], inner_g)
    return result.reshape((outer.shape[0], inner.shape[1]) + size)


def kernel_response_to_constant(weight: Tensor, groups: int, value: Tensor) -> Tensor:
    """Output of a (bias-free) convolution whose whole input window holds ``value[c]`` per channel.

    This is how a per-channel shift in front of a convolution becomes part of its
    bias: sum over taps and input channels of W[o, i, taps] * value[i].
    """
    taps = _taps_last(grouped_view(weight, groups))
    summed = float64(taps[..., 0]) if taps.shape[-1] == 1 else taps.sum(-1, dtype=torch.float64)  # g, o, i
    per_group = value.reshape(groups, -1)  # g, i
    return torch.einsum("goi,gi->go", summed, per_group).reshape(-1)


def scale_input_channels(weight: Tensor, groups: int, scale: Tensor) -> Tensor:
    """Kernel of ``conv(scale[c] * x)``: input channel ``c`` of the kernel times ``scale[c]``."""
    weight_g = grouped_view(weight, groups)
    factor = scale.reshape((groups, 1, -1) + (1,) * (weight.dim() - 2))
    return scaled(weight_g, factor).reshape(weight.shape)


def depthwise_after_pointwise(outer: Tensor, inner: Tensor) -> Tensor:
    """Kernel of a depthwise ``outer`` (one input channel per output, channel multiplier
    ``m``) after a pointwise ``inner``: output ``o`` reads mid channel ``o // m``, so its
    kernel is that mid channel's row of ``inner`` times ``o``'s taps. The result has
    ``inner``'s groups (output blocks line up with the mid channels they read)."""
    multiplier = outer.shape[0] // inner.shape[0]
    rows = inner.reshape(inner.shape[0], -1).repeat_interleave(multiplier, dim=0)  # o, i
    taps = outer.reshape((outer.shape[0], 1) + tuple(outer.shape[2:]))
    return rows.reshape(rows.shape + (1,) * (outer.dim() - 2)) * taps


def pointwise_after_depthwise(outer: Tensor, groups: int, inner: Tensor) -> Tensor:
    """Kernel of a pointwise ``outer`` (``groups`` groups) after a depthwise ``inner``
    (one kernel per channel, no multiplier): input channel ``c`` contributes through
    ``c``'s taps, so each column of ``outer`` is scaled by them."""
    outer_g = grouped_view(outer, groups).reshape(groups, outer.shape[0] // groups, outer.shape[1])
    taps = inner.reshape((groups, 1, outer.shape[1]) + tuple(inner.shape[2:]))
    product = outer_g.reshape(outer_g.shape + (1,) * (inner.dim() - 2)) * taps
    return product.reshape((outer.shape[0], outer.shape[1]) + tuple(inner.shape[2:]))
