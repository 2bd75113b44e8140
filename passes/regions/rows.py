"""Partitions: expressions of tensors that hold a map cut into rows, and how they combine (RepMLP).

RepMLP cuts a feature map into ``h x w`` partitions (reshape, permute, reshape into
``(N*H/h*W/w, C, h, w)``), mixes each partition with a fully connected layer (a grouped
1x1 conv on ``(N', C*h*w, 1, 1)``) and adds kxk convs with BN applied to the same
partitions. Every tensor on the way is a reshape of one matrix with a row per partition:
a reshape that keeps the rows (``rules/shape.py``) gives its node an ``Expr`` with a
``grid``, the layout of each row in the node's trailing dims, while its terms still
compute the rows in their own layout (``Expr.shape``) and the emission reshapes once.

An op that reads the rows in another layout than the terms produce them (a BN over the
share-sets after the FC's flat output, a sum of the FC's rows and the convs' rows) is
exact as a matrix on each row's values: the terms become whole-map forms
(``algebra.dense``), the op its matrix. Two reshapes of one tensor with the same rows
are one source, read in two layouts (``same_rows``), so the FC's term and the convs'
terms merge into one matrix. Every conversion is priced per row like any merge; one that
only makes a term dearer is refused where each merge must pay, and the region merged
whole is then judged against the ops as written (``fold``), so a lone conv is never made
dense. Only static sizes: a whole-map form holds at the one partition size it was cut at.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import fx

from repfx.passes.algebra import dense
from repfx.passes.algebra.forms import ConvForm, NotExact, compose
from repfx.passes.cost import NOTHING, CostRule, elementwise, of_form
from repfx.passes.regions.expr import Analysis, Expr, Term

aten = torch.ops.aten
output_grid = dense.output_grid
_SAME_ORDER = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.clone.default,
               aten.contiguous.default, aten.alias.default, aten.flatten.using_ints, aten.unflatten.int}


def static_layout(node: fx.Node) -> tuple[int, ...] | None:
    """``node``'s shape without its first dim, when every one of those sizes is a plain int."""
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor) or value.dim() < 2 or not value.is_floating_point():
        return None
    sizes = tuple(value.shape[1:])
    return sizes if all(isinstance(size, int) for size in sizes) else None


def trailing_grid(node: fx.Node, features: int) -> tuple[int, ...] | None:
    """The trailing dims of ``node`` holding ``features`` values per row (rows in the leading dims), or None."""
    layout = static_layout(node)
    if layout is None:
        return None
    for start in range(len(layout)):
        if math.prod(layout[start:]) == features:
            return layout[start:]
    return None


def _order_root(node: fx.Node) -> fx.Node:
    """The tensor ``node`` reshapes or copies without reordering its values (row-major order kept)."""
    while (node.op == "call_function" and node.target in _SAME_ORDER and node.args
           and isinstance(node.args[0], fx.Node)):
        node = node.args[0]
    return node


def same_rows(a: fx.Node, b: fx.Node) -> bool:
    """``a`` and ``b`` hold the same partitions, each laid out in its own way: reshapes (and copies) of
    one tensor with as many rows. Values keep their row-major order through such ops, so equal row
    counts cut the same values into the same rows."""
    layouts = static_layout(a), static_layout(b)
    if None in layouts or math.prod(layouts[0]) != math.prod(layouts[1]):
        return False
    if str(a.meta["val"].shape[0]) != str(b.meta["val"].shape[0]):
        return False
    return _order_root(a) is _order_root(b)


def _grid_of(source: fx.Node, form: ConvForm) -> tuple[int, ...]:
    """The per-row layout ``form`` reads from ``source``: a row per sample (dim 0), all sizes static."""
    layout = static_layout(source)
    if layout is None or source.meta["val"].dim() != form.rank + 2:
        raise NotExact("rows", f"{source.name} is not a tensor of partitions with static sizes, one per row")
    return layout


def native_affine(outer: ConvForm, expr: Expr) -> ConvForm | None:
    """``outer``, a per-channel scale and shift of rows laid out as ``expr.grid``, as the per-channel
    scale and shift it is of rows laid out as the terms compute them (``expr.shape``), or None where
    it is none (its factors change within a channel there). A scalar is one in every layout: a scale
    after a reshape folds into the conv before it, which stays a conv."""
    if not outer.is_diagonal or any(outer.padding) or outer.rank != len(expr.grid) - 1:
        return None
    pixels = math.prod(expr.grid[1:])
    scale, shift = (values.repeat_interleave(pixels).reshape(expr.shape[0], -1)
                    for values in (outer.weight.reshape(-1).to(torch.float64), outer.bias))
    if not (torch.equal(scale, scale[:, :1].expand_as(scale)) and torch.equal(shift, shift[:, :1].expand_as(shift))):
        return None
    return ConvForm.affine(scale[:, 0], shift[:, 0], len(expr.shape) - 1)


def _flat(shape: Sequence[int]) -> bool:
    return all(size == 1 for size in shape[1:])


class RowCombinators:
    """Mixed into ``Combinators`` (which provides ``_check_cost`` and ``_distribute``): the combinators
    for expressions with a ``grid``."""

    result: Analysis
    cost: CostRule

    def flatten(self, node: fx.Node, expr: Expr) -> Expr:
        """``expr`` with each term a whole-map form: each row's values flattened (``(F, 1, ..., 1)``).

        What this costs (a kxk conv made a matrix) is priced against the terms as they are.
        """
        if _flat(expr.shape):
            return expr
        terms = tuple(Term(t.source, dense.whole_map(t.form, _grid_of(t.source, t.form)), NOTHING) for t in
                      expr.terms)
        ranks = {term.form.rank for term in terms}
        if len(ranks) != 1:
            raise NotExact("rows", f"{node.name}: partitions read from tensors of different ranks")
        shape = (math.prod(expr.shape),) + (1,) * ranks.pop()
        terms = tuple(Term(t.source, t.form, of_form(t.form, shape)) for t in terms)
        self._check_cost(node, sum((t.cost for t in terms), NOTHING) + (len(terms) - 1) * elementwise(shape),
                         expr.cost)
        return Expr(terms, expr.ops, shape, grid=expr.grid)

    def apply_on_rows(self, outer: ConvForm, expr: Expr, node: fx.Node, extra_ops: Sequence[fx.Node],
                      view: bool) -> Expr:
        """``outer``, written for rows laid out as ``expr.grid``, on rows its terms compute in another
        layout: the terms as whole-map forms, ``outer`` as the matrix it is on a row's flattened values."""
        grid = expr.grid
        out = output_grid(outer, grid)
        flat = self.flatten(node, expr)
        rank = len(flat.shape) - 1
        matrix = dense.as_flat(outer, grid, rank)
        shape = (math.prod(out),) + (1,) * rank
        self.result.own_cost[node] = NOTHING if view else of_form(outer, out)
        separate = flat.cost + self.result.own_cost[node]
        if len(flat.terms) == 1:
            term = flat.terms[0]
            merged = compose(matrix, term.form)
            terms = (Term(term.source, merged, of_form(merged, shape)),)
        elif matrix.is_diagonal and not any(matrix.padding):
            terms = self._distribute(matrix, flat.terms, shape)
        else:
            raise NotExact("different-inputs", f"{outer.describe()} applied to a sum of branches that read "
                           "different tensors")
        self._check_cost(node, sum((t.cost for t in terms), NOTHING) + (len(terms) - 1) * elementwise(shape),
                         separate)
        return Expr(terms, expr.ops | {node, *extra_ops}, shape, grid=out)

    def same_layout(self, node: fx.Node, exprs: Sequence[Expr]) -> tuple[list[Expr], tuple[int, ...]]:
        """The operands of a sum of partitions, all computing their rows in one layout, and the sum's grid.

        An operand without a grid holds one row per sample (its node is laid out as the sum);
        operands whose terms compute rows in different layouts are all flattened.
        """
        rows = node.meta["val"].dim()
        grids = [e.grid if e.grid is not None else e.shape for e in exprs]
        grid = next(e.grid for e in exprs if e.grid is not None)
        if any(e.grid is None and len(e.shape) + 1 != rows for e in exprs) or len({math.prod(g) for g in grids}) != 1:
            raise NotExact("rows", f"{node.name}: adds partitions of {math.prod(grid)} values to a tensor not cut into "
                           "the same partitions")
        exprs = [e if e.grid is not None else Expr(e.terms, e.ops, e.shape, grid=e.shape) for e in exprs]
        if len({e.shape for e in exprs}) != 1:
            exprs = [self.flatten(node, e) for e in exprs]
        return exprs, grid

    def on_one_layout(self, cluster: Term, term: Term, shape: tuple[int, ...]) -> list[ConvForm]:
        """Two terms reading the same partitions from two tensors (``same_rows``), both forms reading
        ``cluster``'s source: as they are when the two lay rows out alike, else as matrices, ``term``'s
        re-read there (only for terms computing flattened rows, ``shape``: a sum has one layout)."""
        grid = _grid_of(cluster.source, cluster.form)
        if _grid_of(term.source, term.form) == grid:
            return [cluster.form, term.form]
        if not _flat(shape):
            raise NotExact("rows", f"{cluster.source.name} and {term.source.name} lay the same partitions out "
                           "differently")
        first = dense.whole_map(cluster.form, grid)
        second = dense.whole_map(term.form, _grid_of(term.source, term.form))
        return [first, dense.rebase(second, grid)]

