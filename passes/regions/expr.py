"""What a linear-region analysis finds: ``Term``s, ``Expr``s, and the ``Analysis`` that holds them.

An ``Expr`` is the affine expression a node computes, a sum of ``Term``s (a
``ConvForm`` applied to a source tensor) standing for a set of graph ops; the
``Analysis`` maps nodes to expressions and keeps what each op costs as written, why
merges were refused and the contested cost decisions it took. Plain data: ``analyzer``
builds it, ``fold`` reads it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from torch import fx

from repfx.passes.algebra.forms import ConvForm
from repfx.passes.cost import NOTHING, CostPolicy, Decisions, Work, elementwise
from repfx.passes.refusals import Refused

__all__ = ["Analysis", "CostPolicy", "Expr", "NotLinear", "Term"]


class NotLinear(Exception):
    """The op is outside linear algebra (a product of two activations...): no region, nothing to report."""


@dataclass(frozen=True, eq=False)
class Term:
    """``form`` applied to what it reads: ``source``, seen through ``layout`` and less ``inner``'s moved shift.

    ``layout``: the form reads ``source.permute(layout)``: a lone permute that pointwise ops on both
    of its sides were moved across (``rules/permute``); the fold emits it again, once.
    ``inner``: the form reads ``source`` *less its constant shift*, which was moved into the form's
    bias (``Linear(a + b + c) = Linear(a + b) + W c``); ``inner`` is ``source``'s expression without
    its shifts, emitted for the form to read (``combine.Combinators.apply``).
    """

    source: fx.Node
    form: ConvForm
    cost: Work  # the op that computes this term by itself (and ``inner``, which it emits)
    shared: fx.Node | None = None  # the term is this op alone, which reads a weight other ops read too
    layout: tuple[int, ...] | None = None
    inner: Expr | None = None

    @property
    def reads(self) -> tuple[fx.Node, ...]:
        """The tensors the term reads from outside the region."""
        if self.inner is None:
            return (self.source,)
        return tuple(dict.fromkeys(node for term in self.inner.terms for node in term.reads))

    @property
    def read_shape(self) -> tuple:
        """The shape of the tensor the form reads (``source``'s, permuted by ``layout``)."""
        shape = tuple(self.source.meta["val"].shape)
        return shape if self.layout is None else tuple(shape[dim] for dim in self.layout)

    def reads_like(self, other: Term) -> bool:
        """Whether both terms' forms read the same tensor (so that their forms may merge)."""
        return self.source is other.source and self.layout == other.layout and self.inner is other.inner


@dataclass(frozen=True, eq=False)
class Expr:
    terms: tuple[Term, ...]
    ops: frozenset[fx.Node]  # graph nodes this expression stands for
    shape: tuple[int, ...]  # per-sample output shape (C, *spatial); (C,) for a channel-last read; per partition,
    # (C*h*w, 1, 1), when ``grid`` is set
    priced: tuple[int, ...] | None = None  # the per-sample shape its cost counts, when not ``shape`` (below)
    # Set when the node holds partitions (RepMLP): its values, row by row, laid out as ``grid`` = (C, h, w) in its
    # trailing dims, and each term a whole-map form (``algebra.dense``) producing a row's values flattened.
    grid: tuple[int, ...] | None = None

    @property
    def cost_shape(self) -> tuple[int, ...]:
        """The shape costs are counted on: ``shape``, except that a channel-last read of ``[N, H, W, C]`` is
        ``(C,)`` for the algebra (the leading dims act as batch) yet computes ``(C, H, W)`` per sample, as its
        NCHW view across a permute does: one unit for the forms on both sides."""
        return self.shape if self.priced is None else self.priced

    def joined(self, *nodes: fx.Node) -> Expr:
        """The same expression standing for ``nodes`` too (ops that compute nothing: a copy, a view)."""
        return replace(self, ops=self.ops | set(nodes))

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def channel_last(self) -> bool:
        """Rank-0 (linear) forms act on the last dim; the others on dim 1."""
        return self.terms[0].form.rank == 0

    @property
    def cost(self) -> Work:
        """The work of computing the terms separately and adding them up (one add per extra term)."""
        return sum((term.cost for term in self.terms), NOTHING) + (len(self.terms) - 1) * elementwise(self.cost_shape)


@dataclass
class Analysis:
    exprs: dict[fx.Node, Expr] = field(default_factory=dict)
    refusals: dict[Refused, None] = field(default_factory=dict)  # an ordered set
    own_cost: dict[fx.Node, Work] = field(default_factory=dict)  # the work of each op as written
    operands: dict[fx.Node, tuple[fx.Node, ...]] = field(default_factory=dict)  # tensors each rule read as operands
    shared: dict[fx.Node, list[str]] = field(default_factory=dict)  # op -> its weights other ops read, with them
    decisions: Decisions = field(default_factory=Decisions)  # the contested single merges, by node name
    rules: dict[fx.Node, str] = field(default_factory=dict)  # node -> the name of the rule that gave its expression

    def refuse(self, node: fx.Node, code: str, reason: str) -> None:
        self.refusals[Refused(node.name, code, reason)] = None

    def roots(self) -> list[fx.Node]:
        """Nodes whose expression no consumer absorbed: each one is a region to consider.

        A reshape that only lays its operand's rows out anew (``rules/shape.py``) ends no region:
        emitted, it would be the same reshape again, so the region ends at its operand.
        """
        absorbed = {op for node, expr in self.exprs.items() for op in expr.ops if op is not node}
        roots = []
        for node in self.exprs:
            if node in absorbed:
                continue
            while self._relabels(node):
                node = node.args[0]
            roots.append(node)
        return roots

    def _relabels(self, node: fx.Node) -> bool:
        operand = node.args[0] if node.args else None
        known = self.exprs.get(operand) if isinstance(operand, fx.Node) else None
        return known is not None and self.exprs[node].grid is not None and self.exprs[node].terms is known.terms

    def region_cost(self, expr: Expr) -> Work:
        """The work of the original ops an expression stands for, in graph order.

        ``expr.ops`` is a set of nodes, which iterates in memory order: the work's ops (the
        decision the report shows, and a modeled time summed in floating point) would come out
        in a different order from run to run.
        """
        return sum((self.own_cost.get(op, NOTHING) for op in sorted(expr.ops)), NOTHING)
