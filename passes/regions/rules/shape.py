"""Rules: shape ops inside a region: a channel-last reshape, and a channel concat.

A reshape that keeps the last dim commutes with ops on the last dim (LeViT's
LinearNorm); a concat on channels of branches of one input stacks their kernels.
"""

from __future__ import annotations


import torch
from torch import fx

from repfx.passes.algebra.forms import NotExact, stack_outputs
from repfx.passes.cost import NOTHING, elementwise, of_form
from repfx.passes.regions.analyzer import Analyzer, Expr, NotLinear, Operand, Term, rule

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
    return Expr(expr.terms, expr.ops | {node}, an.sample_shape(node, channel_last=True))


@rule(aten.cat.default)
def cat(an: Analyzer, node: fx.Node, operand: Operand) -> Expr:
    """A channel concat of single branches of one input: one convolution with stacked kernels."""
    tensors = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    shape = an.sample_shape(node)
    if dim not in (1, -len(shape)) or len(tensors) < 2:
        raise NotLinear
    exprs = [operand(t) for t in tensors]
    if any(len(e.terms) != 1 for e in exprs) or len({id(e.terms[0].source) for e in exprs}) != 1:
        raise NotExact(f"{node.name}: concatenated tensors are not all single branches of one input")
    form = stack_outputs([e.terms[0].form for e in exprs])
    merged_cost = of_form(form, shape)
    an.check_cost(node, merged_cost, sum((e.cost for e in exprs), NOTHING) + elementwise(shape, 1))
    ops = frozenset().union(*(e.ops for e in exprs)) | {node}
    an.result.own_cost[node] = elementwise(shape, 1)
    return Expr((Term(exprs[0].terms[0].source, form, merged_cost),), ops, shape)
