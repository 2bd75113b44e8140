"""Rules: elementwise ops that keep a region affine.

* ``add``/``sub``: a sum of two branches, or a branch plus a per-channel constant;
* ``mul``/``div``/``neg``: a branch times a per-channel constant;
* ``clone``/``alias``/``dropout`` (eval)/``contiguous``/``detach``/``to`` and ``_to_copy``
  to the same dtype and device: the value unchanged;
* ``leaky_relu`` with slope 1, ``prelu`` with every weight 1, ``hardtanh``/``clamp`` bounded
  by infinities only: activations whose parameters make them the identity.

A product of two activations, a rounding division or a layout change is no region.
"""

from __future__ import annotations

import math

import torch
from torch import fx

from repfx.passes.algebra.forms import ConvForm, NotExact
from repfx.passes.canonicalize import branches_could_meet
from repfx.passes.regions.analyzer import Analyzer, Expr, NotLinear, Operand, per_channel, rule
from repfx.passes.regions.values import same_shapes

aten = torch.ops.aten


@rule(aten.add.Tensor, aten.sub.Tensor, aten.add.Scalar, aten.sub.Scalar, aten.rsub.Tensor, aten.rsub.Scalar)
def add(an: Analyzer, node: fx.Node, operand: Operand) -> Expr:
    """``a + alpha * b`` of two branches (equal shapes), or a branch plus a per-channel constant; ``sub`` is
    ``a - alpha * b`` and ``rsub`` (``1 - x``, RT-DETR's inverse sigmoid) ``b - alpha * a``."""
    op = an.arguments(node)
    a, b, alpha = op["input"], op["other"], op["alpha"]
    if node.target in (aten.sub.Tensor, aten.sub.Scalar):
        alpha = -alpha
    if node.target in (aten.rsub.Tensor, aten.rsub.Scalar):
        a, b, alpha = b, a, -alpha
    cl = an.channel_last_broadcast(node)
    shape = an.sample_shape(node, cl)
    const_a, const_b = an.constants.value(a), an.constants.value(b)
    if isinstance(a, fx.Node) and const_a is None and isinstance(b, fx.Node) and const_b is None:
        same_shapes(node, [a, b])  # before ``alpha`` scales b: a broadcast b is no channel mismatch
        eb = operand(b, cl)
        if alpha != 1:
            eb = an.apply(ConvForm.affine(torch.full((shape[0],), float(alpha), dtype=torch.float64),
                                          torch.zeros(shape[0], dtype=torch.float64), len(shape) - 1), eb, node,
                          channel_last=cl)
        return an.add(node, [operand(a, cl), eb], [a, b], cl)
    if const_a is None:  # x + alpha * c
        shift = per_channel(const_b, shape, _rank(a))
        scale = 1.0
        x = a
        factor = alpha
    else:  # c + alpha * x
        shift = per_channel(const_a, shape, _rank(b))
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
    cl = an.channel_last_broadcast(node)
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
    scale = per_channel(factor, shape, _rank(x))
    if scale is None:
        raise NotLinear
    form = ConvForm.affine(scale, torch.zeros(shape[0], dtype=torch.float64), len(shape) - 1)
    return an.apply(form, operand(x, cl), node, channel_last=cl)


@rule(aten.addcmul.default)
def addcmul(an: Analyzer, node: fx.Node, operand: Operand) -> Expr:
    """``shift + value * x * scale`` with per-channel constants ``shift`` and ``scale`` (how the fold writes a
    scale and shift, and a BN written out by hand): a per-channel affine of ``x``."""
    op = an.arguments(node)
    cl = an.channel_last_broadcast(node)
    shape = an.sample_shape(node, cl)
    x, rank = op["tensor1"], _rank(op["tensor1"])
    shift, scale = (per_channel(an.constants.value(op[name]), shape, rank) for name in ("input", "tensor2"))
    if shift is None or scale is None or an.constants.value(x) is not None or not isinstance(op["value"], (int, float)):
        raise NotLinear
    form = ConvForm.affine(scale * float(op["value"]), shift, len(shape) - 1)
    return an.apply(form, operand(x, cl), node, channel_last=cl)


def _rank(x: object) -> int | None:
    """The rank of the tensor an op with a constant applies to (None: not a traced tensor)."""
    value = x.meta.get("val") if isinstance(x, fx.Node) else None
    return value.dim() if isinstance(value, torch.Tensor) else None


@rule(aten.leaky_relu.default, aten.prelu.default, aten.hardtanh.default, aten.clamp.default)
def identity_activation(an: Analyzer, node: fx.Node, operand: Operand) -> Expr:
    """An activation that is its input: the linear ops on both sides chain (VanillaNet anneals its
    ``leaky_relu`` slope to 1, and its converter merges the convs around it). Any other slope,
    weight or bound is a real nonlinearity."""
    op = an.arguments(node)
    if node.target is aten.leaky_relu.default:
        identity = float(op["negative_slope"]) == 1.0
    elif node.target is aten.prelu.default:
        weight = an.constants.tensor(op["weight"])
        identity = weight is not None and bool(torch.all(weight == 1))
    else:
        low, high = (op["min_val"], op["max_val"]) if node.target is aten.hardtanh.default else (op["min"], op["max"])
        identity = low in (None, -math.inf) and high in (None, math.inf)
    if not identity:
        raise NotLinear
    expr = operand(op["input"], an.channel_last_operands(node))
    return expr.joined(node)


_SAME_VALUE = (aten.clone.default, aten.alias.default, aten.dropout.default, aten.contiguous.default,
               aten.detach.default, aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device)
_MEMORY_FORMAT_INDEX = {aten.to.dtype: 4, aten.to.device: 5}  # where it may be positional; elsewhere a keyword


@rule(*_SAME_VALUE)
def identity(an: Analyzer, node: fx.Node, operand: Operand) -> Expr:
    """Value-preserving ops (a copy, a detach, a cast to the same dtype). They join a region
    only around a real linear op, whose emitted convolution is a fresh tensor: a clone or
    contiguous() of a plain tensor may be what a later view needs (strides), so it is left
    alone (``canonicalize.see_through_value_aliases`` has rerouted the readers of those
    that keep the strides too). An op that changes the value's dtype or device, or its
    layout, is a tensor of its own; when region ops read both it and its source, the
    report says why their branches stay apart."""
    if node.target is aten.dropout.default and node.args[2]:
        raise NotLinear  # training-mode dropout is random
    source = node.args[0]
    if not isinstance(source, fx.Node):
        raise NotLinear
    change = _change(node)
    if change is None:
        expr = operand(source, an.channel_last_operands(node))
        if expr.ops:
            return expr.joined(node)
        change = _layout_change(node)
    if change is not None and source not in an.result.exprs and branches_could_meet(node):
        raise NotExact("another-tensor", f"{node.name} is {source.name} {change}: another tensor, so branches reading it "
                       f"do not merge with branches reading {source.name}")
    raise NotLinear


def _change(node: fx.Node) -> str | None:
    """What the op changes besides copying (None: nothing but maybe the strides, as ``contiguous()`` may)."""
    before, after = node.args[0].meta.get("val"), node.meta.get("val")
    if not isinstance(before, torch.Tensor) or not isinstance(after, torch.Tensor):
        raise NotLinear
    if (before.dtype, before.device, before.layout) != (after.dtype, after.device, after.layout):
        return f"converted to {after.dtype} on {after.device}"
    index = _MEMORY_FORMAT_INDEX.get(node.target)
    memory_format = node.args[index] if index is not None and len(node.args) > index else None
    if node.kwargs.get("memory_format", memory_format) not in (None, torch.preserve_format):
        return f"copied to {node.kwargs.get('memory_format', memory_format)}"
    return None


def _layout_change(node: fx.Node) -> str | None:
    """How a copy of a plain tensor changes its strides (None: it does not)."""
    before, after = node.args[0].meta["val"], node.meta["val"]
    if str(before.stride()) == str(after.stride()):
        return None
    return f"copied into another memory layout (strides {tuple(before.stride())} -> {tuple(after.stride())})"
