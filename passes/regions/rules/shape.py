"""Rules: shape ops inside a region: a channel-last reshape, and a channel concat.

A reshape that keeps the last dim commutes with ops on the last dim (LeViT's
LinearNorm); a concat on channels of branches of one input stacks their kernels.
"""

from __future__ import annotations


import torch
from torch import fx

from repfx.passes.regions.analyzer import Analyzer, Expr, NotLinear, Operand, rule

aten = torch.ops.aten


@rule(aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.flatten.using_ints)
def channel_last_view(an: Analyzer, node: fx.Node, operand: Operand) -> Expr:
    """A reshape that keeps the last dim commutes with ops that act on the last dim
    (timm's LinearNorm: linear -> flatten(0, 1) -> BatchNorm1d -> reshape back)."""
    source = node.args[0]
    before, after = source.meta.get("val"), node.meta.get("val")
    if not isinstance(before, torch.Tensor) or not isinstance(after, torch.Tensor) or min(before.dim(), after.dim()) < 2:
        raise NotLinear
    if str(before.shape[-1]) != str(after.shape[-1]):
        raise NotLinear
    expr = operand(source, channel_last=True)
    if not expr.ops or not expr.channel_last:
        raise NotLinear
    return Expr(expr.terms, expr.ops | {node}, an.sample_shape(node, channel_last=True),
                an.priced_shape(node, channel_last=True))


@rule(aten.cat.default)
def cat(an: Analyzer, node: fx.Node, operand: Operand) -> Expr:
    """A channel concat of single branches of one input: one convolution with stacked kernels."""
    arguments = an.arguments(node)
    tensors = arguments["tensors"]
    if arguments["dim"] not in (1, -len(an.sample_shape(node))) or len(tensors) < 2:
        raise NotLinear
    return an.concat(node, [operand(t) for t in tensors])
