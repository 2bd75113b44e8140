"""Find linear regions: for every node, the affine expression it computes of upstream tensors.

Walking the graph once in topological order, each supported op gets an ``Expr``: a
sum of ``Term``s, each a ``ConvForm`` applied to a *source* node (a tensor produced
outside any linear region: an input, a ReLU, a node with several consumers...).
An op absorbs an operand's expression only when that operand has no other consumer;
otherwise the operand is a boundary and enters as an identity term. Terms reading
the same source are merged when exact and not more expensive (``forms`` decides
exactness, the cost rule here decides price). Every refused merge is recorded with
its reason. Nothing is rewritten here: ``fold_linear_regions`` emits the result.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, fx

from repfx.passes.algebra import kernels
from repfx.passes.constants import ConstantFolder
from repfx.passes.algebra.forms import ConvForm, NotExact, compose, merge_parallel, pad_output, stack_outputs

aten = torch.ops.aten
CostPolicy = Literal["macs", "always"]


class NotLinear(Exception):
    """The op is outside linear algebra (a product of two activations...): no region, nothing to report."""


@dataclass(frozen=True, eq=False)
class Term:
    source: fx.Node
    form: ConvForm
    cost: int  # MACs per sample to compute this term by itself


@dataclass(frozen=True, eq=False)
class Expr:
    terms: tuple[Term, ...]
    ops: frozenset[fx.Node]  # graph nodes this expression stands for
    shape: tuple[int, ...]  # per-sample output shape (C, *spatial)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def channel_last(self) -> bool:
        """Rank-0 (linear) forms act on the last dim; the others on dim 1."""
        return self.terms[0].form.rank == 0

    @property
    def cost(self) -> int:
        """MACs to compute the terms separately and add them up (an add costs one per element)."""
        return sum(term.cost for term in self.terms) + (len(self.terms) - 1) * self.numel


@dataclass
class Analysis:
    exprs: dict[fx.Node, Expr] = field(default_factory=dict)
    refusals: dict[tuple[fx.Node, str], None] = field(default_factory=dict)  # ordered set of (node, reason)
    own_cost: dict[fx.Node, int] = field(default_factory=dict)  # MACs per sample of each op as written

    def refuse(self, node: fx.Node, reason: str) -> None:
        self.refusals[(node, reason)] = None

    def region_cost(self, expr: Expr) -> int:
        """MACs per sample of the original ops an expression stands for."""
        return sum(self.own_cost.get(op, 0) for op in expr.ops)


Operand = Callable[..., Expr]  # (arg, channel_last=False) -> Expr
_HANDLERS: dict[Any, Callable[..., Expr]] = {}


def _handles(*targets: Any) -> Callable:
    def register(fn: Callable) -> Callable:
        for target in targets:
            _HANDLERS[target] = fn
        return fn
    return register


def analyze(gm: fx.GraphModule, cost: CostPolicy = "macs") -> Analysis:
    """Expression of every node that belongs to a linear region of ``gm``."""
    return _Analyzer(gm, cost).run()


class _Analyzer:
    def __init__(self, gm: fx.GraphModule, cost: CostPolicy) -> None:
        self.gm = gm
        self.cost_policy = cost
        self.constants = ConstantFolder(gm)
        self.result = Analysis()

    def run(self) -> Analysis:
        for node in self.gm.graph.nodes:
            handler = _HANDLERS.get(node.target) if node.op == "call_function" else None
            if handler is None or self.constants.is_constant(node):
                continue
            expr = self._build(handler, node)
            if expr is not None:
                self.result.exprs[node] = expr
        return self.result

    def _build(self, handler: Callable[..., Expr], node: fx.Node) -> Expr | None:
        """Try with operands' expressions absorbed; on refusal, with operands as boundaries.

        Any other error (an op variant a handler did not foresee) leaves the node
        alone with the error as its refusal: a graph is never half-understood.
        """
        for attempt, operand in enumerate((self._absorbing(node), self._boundary)):
            try:
                return self._same_dtype(node, handler(self, node, operand))
            except NotLinear:
                return None
            except NotExact as refusal:
                if attempt == 0:  # the first refusal explains the node; the retry's is not reported
                    self.result.refuse(node, str(refusal))
            except Exception as error:
                self.result.refuse(node, f"not analyzed: {type(error).__name__}: {error}")
                return None
        return None

    @staticmethod
    def _same_dtype(node: fx.Node, expr: Expr) -> Expr:
        """Type promotion (an fp32 conv times an fp64 buffer) changes the dtype inside a
        region; one emitted conv has one dtype, so such regions are not formed."""
        dtype = node.meta["val"].dtype
        for term in expr.terms:
            if term.source.meta["val"].dtype != dtype:
                raise NotExact(f"{node.name}: dtype changes from {term.source.meta['val'].dtype} to {dtype} "
                               "inside the region (type promotion)")
        return expr

    # -- operands --------------------------------------------------------------------
    def _absorbing(self, consumer: fx.Node) -> Operand:
        def operand(arg: Any, channel_last: bool = False) -> Expr:
            if not isinstance(arg, fx.Node):
                raise NotLinear
            expr = self.result.exprs.get(arg)
            if expr is None or expr.channel_last != self._rank0(arg, channel_last):
                return self._boundary(arg, channel_last)
            if len(arg.users) > 1:
                others = ", ".join(user.name for user in arg.users if user is not consumer)
                self.result.refuse(arg, f"output also used by {others}; not merged into {consumer.name}")
                return self._boundary(arg, channel_last)
            return expr
        return operand

    def _boundary(self, arg: Any, channel_last: bool = False) -> Expr:
        if not isinstance(arg, fx.Node):
            raise NotLinear
        shape = self.sample_shape(arg, channel_last)
        form = ConvForm.identity(shape[0], len(shape) - 1)
        return Expr((Term(arg, form, 0),), frozenset(), shape)

    def _rank0(self, node: fx.Node, channel_last: bool) -> bool:
        """Whether ``node`` is read with rank-0 forms: channel-last reads, and every [N, C] tensor."""
        value = node.meta.get("val")
        return channel_last or (isinstance(value, torch.Tensor) and value.dim() == 2)

    def channel_last_operands(self, node: fx.Node) -> bool:
        """An elementwise op on an N-D tensor continues a channel-last (linear) region
        when one of its operands already is one."""
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor) or value.dim() <= 2:
            return False
        exprs = (self.result.exprs.get(arg) for arg in node.args if isinstance(arg, fx.Node))
        return any(expr is not None and expr.channel_last for expr in exprs)

    def sample_shape(self, node: fx.Node, channel_last: bool = False) -> tuple[int, ...]:
        """Shape without the batch dim (the tensor must be float and at least [N, C]).

        Channel-last reads (a linear on [..., C]) see ``(C,)``: the leading dims
        act as batch. Symbolic sizes (dynamic spatial dims, as TorchScript
        conversion produces) enter only the cost rule, which uses their example
        value: exactness never depends on spatial size because merged forms share
        stride and alignment.
        """
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dim() < 2:
            raise NotLinear
        sizes = value.shape[-1:] if channel_last else value.shape[1:]
        shape = tuple(_example_size(size) for size in sizes)
        if shape[0] is None or not all(isinstance(size, int) for size in shape):
            raise NotExact(f"{node.name} has a symbolic channel count or an unknown size {tuple(value.shape[1:])}")
        return shape

    # -- combinators -----------------------------------------------------------------
    def apply(self, outer: ConvForm, expr: Expr, node: fx.Node, extra_ops: Sequence[fx.Node] = (),
              channel_last: bool = False) -> Expr:
        """Expression of ``outer(expr)``; ``node`` (and ``extra_ops``) join the region."""
        shape = self.sample_shape(node, channel_last)
        ops = expr.ops | {node, *extra_ops}
        self.result.own_cost[node] = outer.macs(shape)
        separate_cost = expr.cost + outer.macs(shape)
        if len(expr.terms) == 1:
            term = expr.terms[0]
            merged = compose(outer, term.form)
            terms = (Term(term.source, merged, merged.macs(shape)),)
        elif outer.is_diagonal and not any(outer.padding):
            terms = self._distribute(outer, expr.terms, shape)
        else:
            raise NotExact(f"{outer.describe()} applied to a sum of branches that read different tensors")
        self.check_cost(node, sum(t.cost for t in terms) + (len(terms) - 1) * math.prod(shape), separate_cost)
        return Expr(terms, frozenset(ops), shape)

    def _distribute(self, outer: ConvForm, terms: Sequence[Term], shape: tuple[int, ...]) -> tuple[Term, ...]:
        """scale * (a + b) + shift = (scale * a + shift) + scale * b: exact for any sum."""
        scale_only = ConvForm(outer.weight, torch.zeros_like(outer.bias), outer.stride, outer.padding,
                              outer.dilation, outer.groups)
        result = []
        for index, term in enumerate(terms):
            form = compose(outer if index == 0 else scale_only, term.form)
            result.append(Term(term.source, form, form.macs(shape)))
        return tuple(result)

    def add(self, node: fx.Node, exprs: Sequence[Expr], operands: Sequence[fx.Node], channel_last: bool) -> Expr:
        shape = self.sample_shape(node, channel_last)
        for operand in operands:
            if _symbolic_shape(operand) != _symbolic_shape(node):
                raise NotExact(f"add broadcasts {_symbolic_shape(operand)} to {_symbolic_shape(node)}; "
                               "branches must have equal shapes")
        self.result.own_cost[node] = math.prod(shape)
        terms = self._merge_terms([t for e in exprs for t in e.terms], node, shape)
        ops = frozenset().union(*(e.ops for e in exprs)) | {node}
        return Expr(terms, ops, shape)

    def _merge_terms(self, terms: Sequence[Term], node: fx.Node, shape: tuple[int, ...]) -> tuple[Term, ...]:
        """Merge terms reading the same source, most expensive first, when exact and not dearer."""
        numel = math.prod(shape)
        clusters: list[Term] = []
        for term in sorted(terms, key=lambda t: -t.cost):
            for index, cluster in enumerate(clusters):
                if cluster.source is not term.source:
                    continue
                try:
                    merged = merge_parallel([cluster.form, term.form])
                    merged_cost = merged.macs(shape)
                    self.check_cost(node, merged_cost, cluster.cost + term.cost + numel)
                except NotExact as refusal:
                    self.result.refuse(node, str(refusal))
                    continue
                clusters[index] = Term(term.source, merged, merged_cost)
                break
            else:
                clusters.append(term)
        sources = {id(t.source) for t in clusters}
        if len(sources) > 1:
            names = ", ".join(dict.fromkeys(t.source.name for t in clusters))
            self.result.refuse(node, f"branches read different tensors ({names}); kept as separate terms")
        return tuple(clusters)

    def check_cost(self, node: fx.Node, merged: int, separate: int) -> None:
        if self.cost_policy == "macs" and merged > separate:
            raise NotExact(f"cost rule: merged op needs {merged:,} MACs per sample vs {separate:,} "
                           f"for the ops it would replace ({merged / max(separate, 1):.2f}x); kept separate")

    # -- helpers for handlers ----------------------------------------------------------
    def weight(self, node: fx.Node, arg: Any, what: str = "weight") -> Tensor:
        value = self.constants.tensor(arg)
        if value is None:
            raise NotExact(f"{node.name}: {what} is computed from graph inputs, not a constant")
        if isinstance(arg, fx.Node):
            others = [u.name for u in arg.users if u is not node and not self.constants.is_constant(u)]
            if others:
                raise NotExact(f"{node.name}: {what} {arg.name} is shared with {', '.join(others)}; "
                               "folding would duplicate it")
        return value

    def per_channel(self, value: Any, shape: tuple[int, ...]) -> Tensor | None:
        """``value`` as a [C] vector if it broadcasts per channel over [N, *shape], else None."""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return torch.full((shape[0],), float(value), dtype=torch.float64)
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dim() > len(shape) + 1:
            return None
        full = value.reshape((1,) * (len(shape) + 1 - value.dim()) + tuple(value.shape))
        if any(size != 1 for dim, size in enumerate(full.shape) if dim != 1) or full.shape[1] not in (1, shape[0]):
            return None
        return full.reshape(-1).to(torch.float64).expand(shape[0]).clone()


def _example_size(size: Any) -> int | None:
    if isinstance(size, int):
        return size
    hint = getattr(getattr(size, "node", None), "hint", None)
    return int(hint) if hint is not None else None


def _symbolic_shape(node: fx.Node) -> str:
    return str(tuple(node.meta["val"].shape[1:]))


def _ints(value: Any, rank: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * rank
    values = tuple(int(v) for v in value)
    return values * rank if len(values) == 1 else values


# -- handlers ---------------------------------------------------------------------------
# Each handler: (analyzer, node, operand) -> Expr, raising NotExact (reported) or NotLinear.

@_handles(aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
          aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding, aten.convolution.default)
def _convolution(an: _Analyzer, node: fx.Node, operand: Operand) -> Expr:
    if node.target is aten.convolution.default:
        x, weight, bias, stride, padding, dilation, transposed, _, groups = node.args
        if transposed:
            raise NotLinear
    else:
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        defaults = (None, None, None, 1, 0, 1, 1)
        x, weight, bias, stride, padding, dilation, groups = (
            node.args[i] if i < len(node.args) else node.kwargs.get(name, default)
            for i, (name, default) in enumerate(zip(names, defaults)))
    w = an.weight(node, weight)
    b = None if bias is None else an.weight(node, bias, "bias")
    rank = w.dim() - 2
    if not isinstance(x, fx.Node) or x.meta["val"].dim() != rank + 2:
        raise NotLinear  # unbatched input: dim 1 is not the channel dim
    dilation = _ints(dilation, rank)
    if isinstance(padding, str):
        if padding == "valid":
            padding = 0
        elif any(((k - 1) * d) % 2 for k, d in zip(w.shape[2:], dilation)):
            raise NotExact(f"{node.name}: padding='same' with an even kernel pads asymmetrically")
        else:
            padding = [(k - 1) * d // 2 for k, d in zip(w.shape[2:], dilation)]
    form = ConvForm.convolution(w, b, _ints(stride, rank), _ints(padding, rank), dilation, int(groups))
    return an.apply(form, operand(x), node)


@_handles(aten.linear.default)
def _linear(an: _Analyzer, node: fx.Node, operand: Operand) -> Expr:
    """A linear layer mixes the last dim; any leading dims act as batch."""
    x, weight, bias = (list(node.args) + [None])[:3]
    w = an.weight(node, weight)
    b = None if bias is None else an.weight(node, bias, "bias")
    form = ConvForm.convolution(w, b, (), (), (), 1)
    return an.apply(form, operand(x, channel_last=True), node, channel_last=True)


@_handles(aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.flatten.using_ints)
def _channel_last_view(an: _Analyzer, node: fx.Node, operand: Operand) -> Expr:
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


def _batch_norm_form(an: _Analyzer, node: fx.Node, args: Sequence[Any], eps: float) -> ConvForm:
    """``node`` is the batch-norm op itself (the owner of its statistics)."""
    x, weight, bias, mean, var = args[:5]
    stats = [an.weight(node, arg, what) if arg is not None else None
             for arg, what in ((weight, "BN weight"), (bias, "BN bias"), (mean, "running_mean"), (var, "running_var"))]
    if stats[2] is None or stats[3] is None:
        raise NotLinear
    as64 = [None if t is None else t.to(torch.float64) for t in stats]
    scale, shift = kernels.batch_norm_scale_shift(as64[2], as64[3], as64[0], as64[1], eps)
    return ConvForm.affine(scale, shift, len(an.sample_shape(x)) - 1)


@_handles(operator.getitem)
def _batch_norm_output(an: _Analyzer, node: fx.Node, operand: Operand) -> Expr:
    bn, index = node.args
    if not isinstance(bn, fx.Node) or bn.target is not aten._native_batch_norm_legit_no_training.default or index != 0:
        raise NotLinear
    if any(user is not node for user in bn.users):
        raise NotLinear  # saved statistics are consumed elsewhere
    form = _batch_norm_form(an, bn, bn.args, float(bn.args[6]))
    return an.apply(form, operand(bn.args[0]), node, extra_ops=(bn,))


@_handles(aten.batch_norm.default)
def _batch_norm(an: _Analyzer, node: fx.Node, operand: Operand) -> Expr:
    if node.args[5]:
        raise NotLinear  # training-mode BN normalizes with batch statistics: not affine in x
    return an.apply(_batch_norm_form(an, node, node.args, float(node.args[7])), operand(node.args[0]), node)


@_handles(aten.add.Tensor, aten.sub.Tensor, aten.add.Scalar, aten.sub.Scalar)
def _add(an: _Analyzer, node: fx.Node, operand: Operand) -> Expr:
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


@_handles(aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar, aten.neg.default)
def _scale(an: _Analyzer, node: fx.Node, operand: Operand) -> Expr:
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


@_handles(aten.clone.default, aten.alias.default, aten.dropout.default, aten.contiguous.default)
def _identity(an: _Analyzer, node: fx.Node, operand: Operand) -> Expr:
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


_POOL_RANK = {aten.avg_pool1d.default: 1, aten.avg_pool2d.default: 2, aten.avg_pool3d.default: 3}


@_handles(*_POOL_RANK)
def _avg_pool(an: _Analyzer, node: fx.Node, operand: Operand) -> Expr:
    args = list(node.args) + [None] * (7 - len(node.args))
    x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor = args[:7]
    shape = an.sample_shape(node)
    rank = len(shape) - 1
    if rank != _POOL_RANK[node.target]:
        raise NotLinear  # unbatched input: dim 1 is not the channel dim
    kernel_size = _ints(kernel_size, rank)
    stride = _ints(stride, rank) if stride else kernel_size
    padding = _ints(padding or 0, rank)
    if ceil_mode:
        raise NotExact(f"{node.name}: ceil_mode pooling has partial windows at the border")
    if any(padding) and count_include_pad is False:
        raise NotExact(f"{node.name}: count_include_pad=False divides border windows by fewer pixels")
    if divisor is not None:
        raise NotExact(f"{node.name}: divisor_override is not a plain average")
    kernel = kernels.avgpool_kernel(shape[0], kernel_size)
    form = ConvForm.convolution(kernel, None, stride, padding, (1,) * rank, shape[0])
    return an.apply(form, operand(x), node)


def _symmetric_padding(node: fx.Node, pad: Sequence[int], rank: int) -> tuple[int, ...]:
    pad = list(pad)
    if len(pad) % 2 or len(pad) > 2 * rank:
        raise NotExact(f"{node.name}: pads non-spatial dims {pad}")
    pad += [0] * (2 * rank - len(pad))
    pairs = [(pad[2 * i], pad[2 * i + 1]) for i in range(rank)][::-1]  # F.pad lists the last dim first
    if any(left != right or left < 0 for left, right in pairs):
        raise NotExact(f"{node.name}: asymmetric or negative padding {pad} has no convolution equivalent")
    return tuple(left for left, _ in pairs)


@_handles(aten.constant_pad_nd.default, aten.pad.default)
def _pad(an: _Analyzer, node: fx.Node, operand: Operand) -> Expr:
    x, pad = node.args[:2]
    if any(user.target is aten.slice_scatter.default and user.args[0] is node for user in node.users):
        raise NotLinear  # border writes follow: the border-fill handler owns this pad
    if node.target is aten.pad.default:
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value")
        if mode != "constant":
            raise NotExact(f"{node.name}: {mode} padding is not zero padding")
    else:
        value = node.args[2] if len(node.args) > 2 else node.kwargs.get("value", 0)
    shape = an.sample_shape(node)
    padding = _symmetric_padding(node, pad, len(shape) - 1)
    value_vec = None if not value else torch.full((shape[0],), float(value), dtype=torch.float64)
    expr = operand(x)
    if len(expr.terms) != 1:
        raise NotExact(f"{node.name}: pads a sum of branches reading different tensors")
    term = expr.terms[0]
    form = pad_output(term.form, padding, value_vec)
    an.result.own_cost[node] = math.prod(shape)
    return Expr((Term(term.source, form, form.macs(shape)),), expr.ops | {node}, shape)


def _fill_value(an: _Analyzer, src: Any, shape: tuple[int, ...]) -> Tensor:
    """The per-channel constant a border write stores (``copy(slice, expand(c))`` or ``c``)."""
    if isinstance(src, fx.Node) and src.target is aten.copy.default:
        src = src.args[1]
    if isinstance(src, fx.Node) and src.target is aten.expand.default:
        src = src.args[0]
    value = an.per_channel(an.constants.value(src), shape)
    if value is None:
        raise NotExact(f"border write of {getattr(src, 'name', src)} is not a per-channel constant")
    return value


@_handles(aten.slice_scatter.default)
def _border_fill(an: _Analyzer, node: fx.Node, operand: Operand) -> Expr:
    """Zero pad + writes of one per-channel constant into exactly the border strips.

    This is padding with a per-channel value, as DBB's BN-and-pad layer writes it
    with slice assignments (functionalized into a chain of ``slice_scatter``).
    """
    if any(user.target is aten.slice_scatter.default and user.args[0] is node for user in node.users):
        raise NotLinear  # not the last write: the last one handles the whole chain
    chain = []
    current = node
    while isinstance(current, fx.Node) and current.target is aten.slice_scatter.default:
        chain.append(current)
        current = current.args[0]
    pad_node = current
    if not isinstance(pad_node, fx.Node) or pad_node.target not in (aten.pad.default, aten.constant_pad_nd.default):
        raise NotLinear
    shape = an.sample_shape(node)
    rank = len(shape) - 1
    padding = _symmetric_padding(pad_node, pad_node.args[1], rank)
    if any(arg not in (None, 0, 0.0, "constant") for arg in pad_node.args[2:]):
        raise NotLinear
    ops = {pad_node, *chain}
    value = None
    writes = set()
    for scatter in chain:
        defaults = (None, None, 0, None, None, 1)
        _, src, dim, start, end, step = tuple(scatter.args) + defaults[len(scatter.args):]
        fill = _fill_value(an, src, shape)
        if value is not None and not torch.allclose(fill, value, rtol=0, atol=0):
            raise NotExact(f"{scatter.name}: border strips hold different values")
        value = fill
        if isinstance(src, fx.Node) and src.target is aten.copy.default:
            ops |= {src, src.args[0]}
            fill_node = src.args[1]
            if isinstance(fill_node, fx.Node) and fill_node.target is aten.expand.default:
                ops.add(fill_node)  # expand(c, [batch, ...]) is not constant under a dynamic batch
        size = shape[dim - 1]
        start = 0 if start is None else (start + size if start < 0 else start)
        end = size if end is None or end > size else (end + size if end < 0 else end)
        if step != 1 or dim < 2:
            raise NotLinear
        writes.add((dim - 2, start, end))
    expected = {(d, 0, p) for d, p in enumerate(padding) if p} | {(d, shape[d + 1] - p, shape[d + 1])
                                                                  for d, p in enumerate(padding) if p}
    if writes != expected:
        raise NotExact(f"{node.name}: writes {sorted(writes)} are not exactly the padded border {sorted(expected)}")
    for op in ops - {node}:
        if any(user not in ops for user in op.users):
            raise NotLinear
    expr = operand(pad_node.args[0])
    if len(expr.terms) != 1:
        raise NotExact(f"{node.name}: pads a sum of branches reading different tensors")
    term = expr.terms[0]
    form = pad_output(term.form, padding, value)
    an.result.own_cost[node] = math.prod(shape)
    return Expr((Term(term.source, form, form.macs(shape)),), expr.ops | ops, shape)


@_handles(aten.cat.default)
def _cat(an: _Analyzer, node: fx.Node, operand: Operand) -> Expr:
    tensors = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    shape = an.sample_shape(node)
    if dim not in (1, -len(shape)) or len(tensors) < 2:
        raise NotLinear
    exprs = [operand(t) for t in tensors]
    if any(len(e.terms) != 1 for e in exprs) or len({id(e.terms[0].source) for e in exprs}) != 1:
        raise NotExact(f"{node.name}: concatenated tensors are not all single branches of one input")
    form = stack_outputs([e.terms[0].form for e in exprs])
    merged_cost = form.macs(shape)
    an.check_cost(node, merged_cost, sum(e.cost for e in exprs) + math.prod(shape))
    ops = frozenset().union(*(e.ops for e in exprs)) | {node}
    an.result.own_cost[node] = math.prod(shape)
    return Expr((Term(exprs[0].terms[0].source, form, merged_cost),), ops, shape)
