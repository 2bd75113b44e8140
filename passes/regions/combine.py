"""The combinators rules build expressions with, and the one place a merge is priced.

A rule maps a node and its operands' expressions to an expression; it composes forms
only through these methods of the analyzer (``apply``, ``add``, ``pad``, ``concat``).
Each records what the op costs as written (``Analysis.own_cost``) and asks the cost
rule whether a merge pays, keeping a contested decision with the analysis: so no rule
prices anything, and every merge is priced the same way.

Partitions (RepMLP): an expression with a ``grid`` stands for a node holding rows (one
per partition) laid out as ``grid``; ops on it and sums of such rows are combined as
matrices on each row's values (``rows``), priced per row, like any other merge.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor, fx

from repfx.passes.algebra.forms import (ConvForm, NotExact, compose, merge_parallel, negligible, pad_output,
                                        stack_outputs)
from repfx.passes.algebra.products import shifted_bias
from repfx.passes.cost import NOTHING, CostRule, Work, elementwise, of_form
from repfx.passes.regions import rows
from repfx.passes.regions.expr import Analysis, Expr, Term
from repfx.passes.regions.values import same_shapes


class Combinators(rows.RowCombinators):
    """Mixed into ``Analyzer``, which provides the walk's ``result``, its ``cost`` rule and ``sample_shape``."""

    result: Analysis
    cost: CostRule

    def apply(self, outer: ConvForm, expr: Expr, node: fx.Node, extra_ops: Sequence[fx.Node] = (),
              channel_last: bool = False, view: bool = False) -> Expr:
        """Expression of ``outer(expr)``; ``node`` (and ``extra_ops``) join the region.

        ``view``: ``node`` only re-lays out a tensor and ``outer`` restates ops of ``extra_ops``,
        which are priced where they stand: ``node`` as written costs nothing.
        """
        grid = None if expr.grid is None else rows.output_grid(outer, expr.grid)  # partitions: as ``outer`` leaves them
        if expr.grid is not None and expr.shape != expr.grid:
            native = rows.native_affine(outer, expr)  # a scale the terms' own layout takes channel by channel
            if native is None:
                return self.apply_on_rows(outer, expr, node, extra_ops, view)
            outer = native
        if expr.grid is None:
            shape, priced = self.sample_shape(node, channel_last), self.priced_shape(node, channel_last)
        else:
            shape = priced = rows.output_grid(outer, expr.shape)  # per row: the rows are the samples priced
        ops = expr.ops | {node, *extra_ops}
        self.result.own_cost[node] = of_form(outer, priced)
        separate_cost = expr.cost + self.result.own_cost[node]
        if len(expr.terms) == 1:
            term = expr.terms[0]
            merged = compose(outer, term.form)
            alone = not expr.ops and any(op in self.result.shared for op in (node, *extra_ops))
            terms = (_rebuilt(term, merged, priced, node if alone else None),)
        elif outer.is_diagonal and not any(outer.padding):
            terms = self._distribute(outer, expr.terms, priced)
        else:
            terms = (self._shift_moved(outer, expr, node, extra_ops, priced),)
        self._check_cost(node, sum(t.cost for t in terms) + (len(terms) - 1) * elementwise(priced), separate_cost)
        if view:
            self.result.own_cost[node] = NOTHING
        return Expr(terms, frozenset(ops), shape, None if grid is not None else priced, grid)

    def _distribute(self, outer: ConvForm, terms: Sequence[Term], shape: tuple[int, ...]) -> tuple[Term, ...]:
        """scale * (a + b) + shift = (scale * a + shift) + scale * b: exact for any sum."""
        scale_only = ConvForm(outer.weight, torch.zeros_like(outer.bias), outer.stride, outer.padding,
                              outer.dilation, outer.groups)
        result = []
        for index, term in enumerate(terms):
            form = compose(outer if index == 0 else scale_only, term.form)
            result.append(_rebuilt(term, form, shape))
        return tuple(result)

    def _shift_moved(self, outer: ConvForm, expr: Expr, node: fx.Node, extra_ops: Sequence[fx.Node],
                     shape: tuple[int, ...]) -> Term:
        """``outer(a + b + c)`` of branches reading different tensors, as ``outer(a + b)`` with ``outer``'s
        response to the constant ``c`` in its bias: exact for an unpadded ``outer`` (every output pixel
        reads ``c`` at every tap), so the sum is emitted without the op that added ``c`` (GRN's beta, a
        bias added before a projection). The branches themselves stay apart."""
        different = f"{outer.describe()} applied to a sum of branches that read different tensors"
        shift = sum((term.form.bias for term in expr.terms), torch.zeros_like(expr.terms[0].form.bias))
        read = [arg for op in (node, *extra_ops) for arg in op.all_input_nodes if arg in expr.ops]
        if outer.transposed or negligible(shift) or not read or not all(t.form.is_diagonal for t in expr.terms):
            raise NotExact("different-inputs", different)  # a branch's conv adds the shift for free: nothing to save
        if any(outer.padding):
            raise NotExact("different-inputs", f"{different}; their constant shift does not move into it "
                           "either, as it zero-pads (the border would not see the shift)")
        bare = tuple(_rebuilt(term, replace(term.form, bias=torch.zeros_like(term.form.bias)), expr.cost_shape)
                     for term in expr.terms)
        inner = Expr(bare, expr.ops, expr.shape, expr.priced)
        moved = replace(outer, bias=shifted_bias(outer, shift))
        return Term(read[0], moved, of_form(moved, shape) + inner.cost, inner=inner)

    def add(self, node: fx.Node, exprs: Sequence[Expr], operands: Sequence[fx.Node], channel_last: bool) -> Expr:
        same_shapes(node, operands)
        grid = None
        if any(e.grid is not None for e in exprs):
            exprs, grid = self.same_layout(node, exprs)
            shape = priced = exprs[0].shape
        else:
            shape, priced = self.sample_shape(node, channel_last), self.priced_shape(node, channel_last)
        self.result.own_cost[node] = elementwise(priced, len(operands))
        terms = self._merge_terms([t for e in exprs for t in e.terms], node, priced, grid is not None)
        ops = frozenset().union(*(e.ops for e in exprs)) | {node}
        return Expr(terms, ops, shape, None if grid is not None else priced, grid)

    def _merge_terms(self, terms: Sequence[Term], node: fx.Node, shape: tuple[int, ...],
                     on_rows: bool = False) -> tuple[Term, ...]:
        """Merge terms reading the same source, most expensive first, when exact and not dearer.

        ``on_rows``: the terms are whole-map forms of partitions, so terms reading two layouts of
        the same partitions (two reshapes of one tensor) merge too (``rows.same_rows``).
        """
        add = elementwise(shape)
        clusters: list[Term] = []
        for term in sorted(terms, key=lambda t: -t.cost.macs):
            for index, cluster in enumerate(clusters):
                same = cluster.reads_like(term)
                if not same and not (on_rows and rows.same_rows(cluster.source, term.source)):
                    continue
                try:
                    forms = [cluster.form, term.form] if same else self.on_one_layout(cluster, term, shape)
                    merged = _rebuilt(cluster, merge_parallel(forms), shape)
                    self._check_cost(node, merged.cost, cluster.cost + term.cost + add)
                except NotExact as refusal:
                    self.result.refuse(node, refusal.code, refusal.reason)
                    continue
                clusters[index] = merged
                break
            else:
                clusters.append(term)
        sources = {(id(t.source), t.layout, id(t.inner)) for t in clusters}
        if len(sources) > 1:
            names = ", ".join(dict.fromkeys(t.source.name for t in clusters))
            self.result.refuse(node, "different-inputs", f"branches read different tensors ({names}); kept as separate terms")
        return tuple(clusters)

    def pad(self, node: fx.Node, expr: Expr, padding: Sequence[int], value: Tensor | None,
            extra_ops: frozenset[fx.Node] = frozenset()) -> Expr:
        """``expr`` padded by ``padding`` with a per-channel ``value`` (zeros when None); as written, one copy."""
        shape = self.sample_shape(node)
        if expr.grid is not None:
            raise NotExact("rows", f"{node.name}: pads partitions (a reshaped map) as if they were a map")
        if len(expr.terms) != 1:
            raise NotExact("different-inputs", f"{node.name}: pads a sum of branches reading different tensors")
        term = expr.terms[0]
        form = pad_output(term.form, padding, value)
        self.result.own_cost[node] = elementwise(shape, 1)
        return Expr((_rebuilt(term, form, shape),), expr.ops | extra_ops | {node}, shape)

    def concat(self, node: fx.Node, exprs: Sequence[Expr]) -> Expr:
        """A channel concat of single branches of one input: one form with stacked kernels, when that pays
        (as written, the branches and one copy of their outputs)."""
        shape = self.sample_shape(node)
        if any(e.grid is not None for e in exprs):
            raise NotExact("rows", f"{node.name}: concatenates partitions (reshaped maps)")
        if any(len(e.terms) != 1 or not e.terms[0].reads_like(exprs[0].terms[0]) for e in exprs):
            raise NotExact("different-inputs",
                           f"{node.name}: concatenated tensors are not all single branches of one input")
        merged, copy = _rebuilt(exprs[0].terms[0], stack_outputs([e.terms[0].form for e in exprs]), shape), \
            elementwise(shape, 1)
        self._check_cost(node, merged.cost, sum((e.cost for e in exprs), NOTHING) + copy)
        self.result.own_cost[node] = copy
        ops = frozenset().union(*(e.ops for e in exprs)) | {node}
        return Expr((merged,), ops, shape)

    def relayout(self, node: fx.Node, expr: Expr, terms: Sequence[Term], extra_ops: Sequence[fx.Node],
                 channel_last: bool) -> Expr:
        """``node`` (a transpose or permute) re-lays out ``expr`` as ``terms`` (each reading its source through a
        layout): as written a view, costing nothing; nothing merges here, so nothing is priced."""
        shape, priced = self.sample_shape(node, channel_last), self.priced_shape(node, channel_last)
        self.result.own_cost[node] = NOTHING
        terms = tuple(_rebuilt(term, term.form, priced, term.shared) for term in terms)
        return Expr(terms, expr.ops | {node, *extra_ops}, shape, priced)

    def _check_cost(self, node: fx.Node, merged: Work, separate: Work) -> None:
        """Refuse the merge at ``node`` unless the rule says it pays and it stays within the rule's parameter
        bound (``AlwaysMerge`` never asks); a contested decision is kept with the analysis."""
        if self.cost.merges_everything:
            return
        verdict = self.cost.pays(merged, separate, node.name)
        if not verdict.won:
            self.result.decisions.note(verdict)
            raise NotExact("cost", self.cost.merge_refused(merged, separate))
        growth = self.cost.param_growth(merged, separate)
        if growth:  # a merge that pays in time but not in size: the decision it won is not the one the graph follows
            raise NotExact("param-growth", growth)
        self.result.decisions.note(verdict)


def _rebuilt(term: Term, form: ConvForm, shape: tuple[int, ...], shared: fx.Node | None = None) -> Term:
    """``term`` with ``form`` instead, reading what it read (a layout, an inner sum), priced again."""
    inner = NOTHING if term.inner is None else term.inner.cost
    return replace(term, form=form, cost=of_form(form, shape) + inner, shared=shared)
