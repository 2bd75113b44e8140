"""Rules: shape ops inside a region: a channel-last reshape, a reshape of partitions, and a channel concat.

A reshape that keeps the last dim commutes with ops on the last dim (LeViT's
LinearNorm); one that keeps the rows of a tensor (a row per partition, RepMLP) only lays
each row out anew (``regions.rows``); a concat on channels of branches of one input
stacks their kernels.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import fx

from repfx.passes.regions.analyzer import Analyzer, Expr, NotLinear, Operand, rule
from repfx.passes.regions.rows import static_layout, trailing_grid

aten = torch.ops.aten


@rule(aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.flatten.using_ints)
def view(an: Analyzer, node: fx.Node, operand: Operand) -> Expr:
    """A reshape inside a region: channel-last, or of partitions (rows); else a layout change (no region)."""
    source = node.args[0]
    before, after = source.meta.get("val"), node.meta.get("val")
    if not isinstance(before, torch.Tensor) or not isinstance(after, torch.Tensor) or min(before.dim(), after.dim()) < 2:
        raise NotLinear
    known = an.result.exprs.get(source)
    if str(before.shape[-1]) == str(after.shape[-1]) and (known is None or known.grid is None):
        expr = operand(source, channel_last=True)
        if expr.ops and expr.channel_last:
            return channel_last_view(an, node, expr)
    return rows_view(an, node, operand)


def channel_last_view(an: Analyzer, node: fx.Node, expr: Expr) -> Expr:
    """A reshape that keeps the last dim commutes with ops that act on the last dim
    (timm's LinearNorm: linear -> flatten(0, 1) -> BatchNorm1d -> reshape back)."""
    return Expr(expr.terms, expr.ops | {node}, an.sample_shape(node, channel_last=True),
                an.priced_shape(node, channel_last=True))


def rows_view(an: Analyzer, node: fx.Node, operand: Operand) -> Expr:
    """A reshape that keeps the rows of its input (RepMLP's ``(N', C*h*w, 1, 1)`` into ``(N', C, h, w)``,
    or into ``(N, H/h, W/w, C, h, w)``): the rows' values are the same, laid out anew in the trailing dims.

    The input's rows are its samples (dim 0), or the rows its own expression says. Nothing is
    computed here; the terms keep computing the rows as they do (``regions.rows``).
    """
    source = node.args[0]
    expr = operand(source)
    if not expr.ops:
        raise NotLinear  # a reshape of a plain tensor: nothing linear to fold
    if expr.grid is None and (expr.channel_last or static_layout(source) is None):
        raise NotLinear  # channel-last rows are not the samples; a symbolic size is no fixed partition
    features = math.prod(expr.grid if expr.grid is not None else static_layout(source))
    grid = trailing_grid(node, features)
    if grid is None or static_layout(node) is None:
        raise NotLinear  # rows cut elsewhere: a layout change
    return replace(expr.joined(node), grid=grid)


@rule(aten.cat.default)
def cat(an: Analyzer, node: fx.Node, operand: Operand) -> Expr:
    """A channel concat of single branches of one input: one convolution with stacked kernels."""
    arguments = an.arguments(node)
    tensors = arguments["tensors"]
    if arguments["dim"] not in (1, -len(an.sample_shape(node))) or len(tensors) < 2:
        raise NotLinear
    return an.concat(node, [operand(t) for t in tensors])
