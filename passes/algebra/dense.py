"""Whole-map forms: a convolution on a map of one fixed size, as one matrix on the flattened map.

RepMLP's locality injection: a kxk convolution with zero padding applied to ``h x w``
partitions is, on each partition, a linear map from the ``C*h*w`` values of the
partition to the ``O*h*w`` values of its output, so it adds into the matrix of the fully
connected layer that mixes the same partitions. That map is itself a convolution: one
whose kernel covers the whole input (``h x w`` taps, no padding, a single output pixel,
``O*h*w`` output channels in the flattened order). This *whole-map form* is exact only on
inputs of exactly that size, which is what a partition is: its size is written in the
reshape that cuts it, and the graph only runs at that size.

Groups stay groups: a grouped convolution's channel blocks are contiguous in the
flattened order (channel-major), so its matrix is block diagonal with the same number of
blocks, and a depthwise kxk becomes a grouped whole-map form, not a dense one.

* ``whole_map(form, grid)``: ``form`` on inputs laid out as ``grid`` = ``(C, *spatial)``;
* ``as_flat(form, grid)``: the same matrix acting on the flattened values laid out as
  ``(C*prod(spatial), 1, ..., 1)`` (what a partition perceptron's 1x1 reads);
* ``rebase(form, grid)``: a whole-map form re-read on another layout of the same values.

Kernels are deferred (``deferred``): pricing a merge the cost rule refuses computes nothing.
No torch.fx here.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from repfx.passes.algebra.deferred import Deferred
from repfx.passes.algebra.forms import ConvForm
from repfx.passes.algebra.kernels import float64, regroup
from repfx.passes.refusals import NotExact


def output_grid(form: ConvForm, grid: Sequence[int]) -> tuple[int, ...]:
    """``(C_out, *spatial)`` that ``form`` produces from an input laid out as ``grid``."""
    _check_reads(form, grid)
    spatial = tuple((size + 2 * p - d * (k - 1) - 1) // s + 1 for size, k, s, p, d
                    in zip(grid[1:], form.kernel_size, form.stride, form.padding, form.dilation))
    if any(size < 1 for size in spatial):
        raise NotExact("rows", f"{form.describe()} produces no output on a {_text(grid)} partition")
    return (form.out_channels, *spatial)


def is_whole_map(form: ConvForm, grid: Sequence[int]) -> bool:
    """``form`` already reads its whole ``grid`` input with one kernel placement, unpadded."""
    return (not form.transposed and form.rank == len(grid) - 1 and form.in_channels == grid[0]
            and tuple(form.kernel_size) == tuple(grid[1:]) and not any(form.padding)
            and all(d == 1 or k == 1 for d, k in zip(form.dilation, form.kernel_size)))


def whole_map(form: ConvForm, grid: Sequence[int]) -> ConvForm:
    """``form`` applied to inputs of exactly ``grid`` = ``(C, *spatial)``, as a whole-map convolution.

    Its output is ``(O*prod(out_spatial), 1, ..., 1)``: the form's output flattened channel-major.
    """
    grid = tuple(grid)
    rank = len(grid) - 1
    ones, zeros = (1,) * rank, (0,) * rank
    if is_whole_map(form, grid):
        return ConvForm(form.kernel, form.bias, ones, zeros, ones, form.groups)
    out = output_grid(form, grid)
    pixels = math.prod(out[1:])
    groups = form.groups
    shape = (form.out_channels * pixels, grid[0] // groups) + grid[1:]

    def matrix() -> Tensor:
        """Tap by tap, the kernel's values placed where each output pixel reads: no larger than the matrix."""
        weight = float64(form.weight)
        result = torch.zeros(form.out_channels, pixels, shape[1], math.prod(grid[1:]), dtype=torch.float64)
        for tap in itertools.product(*(range(k) for k in form.kernel_size)):
            reads = _reads(tap, grid[1:], out[1:], form.stride, form.padding, form.dilation)
            result += torch.einsum("oc,qp->oqcp", weight[(slice(None), slice(None), *tap)], reads)
        return result.reshape(shape)

    return ConvForm(Deferred(shape, matrix), form.bias.repeat_interleave(pixels), ones, zeros, ones, groups)


def as_flat(form: ConvForm, grid: Sequence[int], rank: int) -> ConvForm:
    """``form`` on inputs laid out as ``grid``, acting instead on those values flattened into
    ``(prod(grid), 1, ..., 1)`` (``rank`` spatial dims of size 1): a grouped 1x..x1 form."""
    return rebase(whole_map(form, grid), (math.prod(grid),) + (1,) * rank)


def rebase(form: ConvForm, grid: Sequence[int]) -> ConvForm:
    """A whole-map ``form`` read on ``grid``, another layout of the same flattened values.

    A group must still be whole channels of ``grid``; where the form's groups split a channel,
    it is regrouped to the most groups that do not (one always does: a single group).
    """
    grid = tuple(grid)
    features = form.in_channels * math.prod(form.kernel_size)
    if features != math.prod(grid):
        raise NotExact("rows", f"{form.describe()} reads {features} values per partition, not the {math.prod(grid)} "
                       f"of a {_text(grid)} partition")
    rank = len(grid) - 1
    ones, zeros = (1,) * rank, (0,) * rank
    if tuple(form.kernel_size) == grid[1:] and form.in_channels == grid[0]:
        return ConvForm(form.kernel, form.bias, ones, zeros, ones, form.groups)
    groups = max(g for g in range(1, form.groups + 1) if form.groups % g == 0 and grid[0] % g == 0)
    shape = (form.out_channels, grid[0] // groups) + grid[1:]

    def reread() -> Tensor:
        return regroup(float64(form.weight), form.groups, groups).reshape(shape)

    return ConvForm(Deferred(shape, reread), form.bias, ones, zeros, ones, groups)


def _reads(tap: Sequence[int], sizes: Sequence[int], out_sizes: Sequence[int], stride: Sequence[int],
           padding: Sequence[int], dilation: Sequence[int]) -> Tensor:
    """0/1 matrix (output pixels x input pixels): which input pixel each output pixel reads at ``tap``
    (none where it reads the zero padding)."""
    reads = torch.ones(1, 1, dtype=torch.float64)
    for t, size, out_size, s, p, d in zip(tap, sizes, out_sizes, stride, padding, dilation):
        source = torch.arange(out_size) * s + t * d - p
        dim = torch.zeros(out_size, size, dtype=torch.float64)
        inside = (source >= 0) & (source < size)
        dim[torch.arange(out_size)[inside], source[inside]] = 1.0
        reads = torch.kron(reads, dim)
    return reads


def _check_reads(form: ConvForm, grid: Sequence[int]) -> None:
    if form.transposed:
        raise NotExact("transposed", "a transposed convolution on a partition is not written as one matrix here")
    if form.rank != len(grid) - 1 or form.in_channels != grid[0]:
        raise NotExact("rows", f"{form.describe()} does not read a {_text(grid)} partition")


def _text(grid: Sequence[int]) -> str:
    return "x".join(map(str, grid))
