"""Cross-layer equalization's tensor algebra (Nagel et al. 2019, "Data-Free Quantization"): no torch.fx here.

Two layers with a positively homogeneous activation f between them (f(x / s) = f(x) / s
for every s > 0, per channel) compute the same function when output channel i of the
first is divided by s_i (weights and bias) and input channel i of the second is
multiplied by s_i. Choosing s_i = sqrt(r1_i / r2_i), from the largest |weight| r1_i of
the first layer's output channel i and r2_i of the second layer's input channel i,
makes both ranges sqrt(r1_i * r2_i): a channel whose weights dwarf the rest (an
identity branch folded with a BN scale of 300) gives part of its range to its
neighbour, so per-tensor and per-channel INT8 scales fit the weights better.

A weight is ``[out, in / groups, *kernel]`` (a linear's ``[out, in]`` is the same with
no kernel). Input channel i of a grouped layer is read by the outputs of group
``i // (in / groups)`` at position ``i % (in / groups)``; ``input_map`` spreads a
per-input-channel vector onto that ``[out, in / groups]`` layout, which makes grouped
and depthwise layers one case with dense ones.
"""

from __future__ import annotations

import torch
from torch import Tensor


def output_ranges(weight: Tensor) -> Tensor:
    """[out]: the largest |w| of each output channel."""
    return weight.detach().abs().reshape(weight.shape[0], -1).amax(1)


def input_ranges(weight: Tensor, groups: int) -> Tensor:
    """[in]: the largest |w| any output channel applies to each input channel."""
    out, per_group = weight.shape[0], weight.shape[1]
    largest = weight.detach().abs().reshape(out, per_group, -1).amax(2)  # [out, in / groups]
    return largest.reshape(groups, out // groups, per_group).amax(1).reshape(-1)


def input_map(values: Tensor, weight: Tensor, groups: int) -> Tensor:
    """[out, in / groups]: ``values[i]`` (one per input channel) where each output channel reads input channel i."""
    out, per_group = weight.shape[0], weight.shape[1]
    return values.reshape(groups, 1, per_group).expand(groups, out // groups, per_group).reshape(out, per_group)


def equalizing_scales(first_ranges: Tensor, second_ranges: Tensor) -> Tensor:
    """s_i = sqrt(r1_i / r2_i); 1 where either range is 0 (a dead channel has nothing to balance)."""
    live = (first_ranges > 0) & (second_ranges > 0)
    ratio = torch.where(live, first_ranges / torch.where(live, second_ranges, 1), 1)
    return ratio.sqrt()


def scale_outputs(weight: Tensor, bias: Tensor | None, scales: Tensor) -> tuple[Tensor, Tensor | None]:
    """The first layer with output channel i divided by ``scales[i]`` (weight and bias)."""
    shaped = scales.reshape(-1, *([1] * (weight.dim() - 1)))
    return weight / shaped, None if bias is None else bias / scales


def scale_inputs(weight: Tensor, scales: Tensor, groups: int) -> Tensor:
    """The second layer with input channel i multiplied by ``scales[i]``."""
    mapped = input_map(scales, weight, groups)
    return weight * mapped.reshape(*mapped.shape, *([1] * (weight.dim() - 2)))


def absorbed_bias(weight: Tensor, bias: Tensor | None, shift: Tensor, groups: int) -> Tensor:
    """The second layer's bias once ``shift`` (one value per input channel) is taken off its input.

    ``W (y - c) + b + W c``: the added term is constant over the map only where every
    output reads whole windows of y, i.e. the second layer pads nothing (the caller
    checks); a zero-padded border would see ``-c`` where the original sees 0.
    """
    mapped = input_map(shift, weight, groups)
    added = (weight.reshape(*mapped.shape, -1).sum(2) * mapped).sum(1)
    return added if bias is None else bias + added


def range_spread(ranges: Tensor) -> float:
    """max / median of per-channel ranges: how far the widest channel sits above a typical one."""
    median = ranges.median()
    return float(ranges.max() / median) if median > 0 else float("inf")
