"""Rules: elementwise ops that keep a region affine.

* ``add``/``sub``: a sum of two branches, or a branch plus a per-channel constant;
* ``mul``/``div``/``neg``: a branch times a per-channel constant;
* ``clone``/``alias``/``dropout`` (eval)/``contiguous``: the value unchanged.

A product of two activations, a rounding division or a layout change is no region.
"""

from __future__ import annotations

import torch
from torch import fx

from repfx.passes.algebra.forms import ConvForm
from repfx.passes.regions.analyzer import Analyzer, Expr, NotLinear, Operand, rule

aten = torch.ops.aten


@rule(aten.add.Tensor, aten.sub.Tensor, aten.add.Scalar, aten.sub.Scalar)
def add(an: Analyzer, node: fx.Node, operand: Operand) -> Expr:
    """``a + alpha * b`` of two branches (equal shapes), or a branch plus a per-channel constant."""
    a, b = node.args[:2]
    alpha = node.kwargs.get("alpha", 1)
    if node.target in (aten.sub.Tensor, aten.sub.Scalar):
        alpha = -alpha
    cl = an.channel_last_operands(node)
    shape = an.sample_shape(node, cl)
    const_a, const_b = an.constants.value(a), an.constants.value(b)
    if isinstance(a, fx.Node) and const_a is None and isinstance(b, fx.Node) and const_b is None:
        eb = operand(b, cl)
        if alpha != 1:
            eb = an.apply(ConvForm.affine(torch.full((shape[0],), float(alpha), dtype=torch.float64),
                                          torch.zeros(shape[0], dtype=torch.float64), len(shape) - 1), eb, node,
                          channel_last=cl)
        return an.add(node, [operand(a, cl), eb], [a, b], cl)
    if const_a is None:  # x + alpha * c
        shift = an.per_channel(const_b, shape)
        scale = 1.0
        x = a
        factor = alpha
    else:  # c + alpha * x
        shift = an.per_channel(const_a, shape)
        scale = float(alpha)
        x = b
        factor = 1
    if shift is None:
        raise NotLinear
    form = ConvForm.affine(torch.full((shape[0],), scale, dtype=torch.float64), shift * factor, len(shape) - 1)
    return an.apply(form, operand(x, cl), node, channel_last=cl)


@rule(aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar, aten.neg.default)
def scale(an: Analyzer, node: fx.Node, operand: Operand) -> Expr:
    """A branch times (or divided by) a scalar or per-channel constant; ``neg`` is a scale of -1."""
    cl = an.channel_last_operands(node)
    shape = an.sample_shape(node, cl)
    if node.target is aten.neg.default:
        x, factor = node.args[0], -1.0
    else:
        a, b = node.args[:2]
        if node.target in (aten.div.Tensor, aten.div.Scalar) and node.kwargs.get("rounding_mode") is not None:
            raise NotLinear
        const_b = an.constants.value(b)
        x, factor = (a, const_b) if const_b is not None else (b, an.constants.value(a))
        if node.target in (aten.div.Tensor, aten.div.Scalar):
            if const_b is None:
                raise NotLinear
            factor = 1.0 / factor if isinstance(factor, (int, float)) else torch.reciprocal(factor)
    scale = an.per_channel(factor, shape)
    if scale is None:
        raise NotLinear
    form = ConvForm.affine(scale, torch.zeros(shape[0], dtype=torch.float64), len(shape) - 1)
    return an.apply(form, operand(x, cl), node, channel_last=cl)


@rule(aten.clone.default, aten.alias.default, aten.dropout.default, aten.contiguous.default)
def identity(an: Analyzer, node: fx.Node, operand: Operand) -> Expr:
    """Value-preserving ops. They join a region only around a real linear op, whose
    emitted convolution is a fresh tensor: a clone or contiguous() of a plain tensor
    may be what a later view needs (strides), so it is left alone."""
    if node.target is aten.dropout.default and node.args[2]:
        raise NotLinear  # training-mode dropout is random
    if node.kwargs.get("memory_format") not in (None, torch.preserve_format):
        raise NotLinear  # a layout change, not a value change
    expr = operand(node.args[0], an.channel_last_operands(node))
    if not expr.ops:
        raise NotLinear
    return Expr(expr.terms, expr.ops | {node}, expr.shape)
