"""Rule: a transpose or permute inside a region: pointwise ops commute with it.

A pointwise op (a BN, a per-channel scale or shift, a 1x1 conv, a linear) mixes
channels pixel by pixel, so it commutes with any rearrangement of the other dims:
``P(f(s))`` is ``f`` acting on ``P(s)``'s dim that ``P`` moved ``s``'s channel dim to.
When that is dim 1 or the last dim, a form on ``P(s)`` acts there, and the region
goes on through the permute: its terms read their source through a *layout*
(``Term.layout``), which the fold emits once, before or after the merged op.

* Between a permutation and its inverse (``bn1d(x.transpose(1, 2)).transpose(1, 2)``
  on tokens, ``bn2d(y.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)`` channels-last) the
  layouts cancel and no permute is left: the BN folds into the linear before it.
* A lone permute between pointwise ops (a channels-last ``Linear -> permute(0, 3, 1, 2)
  -> BatchNorm2d``; ``BatchNorm2d -> permute(0, 2, 3, 1) -> Linear``) stays, once, and
  the ops on its two sides merge: UniRepLKNet's FFN ends so.

A permute that stays joins a region only when an op after it can merge (else the region
ends before it: re-emitting it saves nothing). A permute of a tensor no region computes
is a layout change (no region); one that
moves the channel dim elsewhere than dim 1 or the last dim, or follows an op that
reads neighbouring pixels, stays as written (reported when it would have undone the
permute before that op).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import fx

from repfx.passes.algebra.forms import NotExact, pointwise_at_rank
from repfx.passes.regions.analyzer import Analyzer, Expr, NotLinear, Operand, Term, rule

aten = torch.ops.aten


def _permutation(node: fx.Node) -> list[int] | None:
    """Where each output dim of a transpose/permute node comes from, or None for another op."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    rank = node.meta["val"].dim()
    if node.target is aten.permute.default:
        return [dim % rank for dim in node.args[1]]
    if node.target is aten.transpose.int:
        perm = list(range(rank))
        first, second = node.args[1] % rank, node.args[2] % rank
        perm[first], perm[second] = second, first
        return perm
    return None


def _inverse_pair(outer: fx.Node, inner: fx.Node) -> bool:
    """``outer(inner(s))`` is ``s``: the two permutations undo each other."""
    out_perm, in_perm = _permutation(outer), _permutation(inner)
    return in_perm is not None and [in_perm[dim] for dim in out_perm] == list(range(len(out_perm)))


@rule(aten.transpose.int, aten.permute.default)
def permutation(an: Analyzer, node: fx.Node, operand: Operand) -> Expr:
    """``P(expr)``: every term of ``expr`` read through one more layout, its form moved to where ``P`` puts
    its channel dim."""
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor) or value.dim() < 3:
        raise NotLinear
    middle = node.args[0]
    known = an.result.exprs.get(middle)
    if known is not None and known.grid is not None:
        raise NotLinear  # partitions (a reshaped map): a permutation moves values between rows
    if known is None:
        if not _inverse_pair(node, middle):
            raise NotLinear  # a layout change of a tensor no region computes
        return _undone(an, node, operand, middle)  # P^-1(P(s)) is s
    pair = len(known.terms) == 1 and _inverse_pair(node, known.terms[0].source)
    if not pair and (len(middle.users) > 1 or middle in an.boundaries):
        raise NotLinear  # a layout change of a tensor read elsewhere too (a pair reports it, through ``operand``)
    expr = operand(middle, known.channel_last)
    if not expr.ops:
        raise NotLinear  # read as a boundary: a layout change
    perm, rank = _permutation(node), value.dim()
    channel = rank - 1 if expr.channel_last else 1  # where the forms' channel dim is, in ``middle``
    moved_to = perm.index(channel)
    if moved_to not in (1, rank - 1):
        raise NotLinear  # neither dim 1 nor the last dim: no form acts there
    if any(term.form.transposed for term in expr.terms):
        raise NotLinear  # a transposed convolution's output grid is its own: it stays before the permute
    if len(expr.terms) == 1:
        undone = _undoes(an, node, operand, expr, moved_to == rank - 1)
        if undone is not None:
            return undone
    others = [str(size) for dim, size in enumerate(middle.meta["val"].shape) if dim != channel]
    if any([str(size) for dim, size in enumerate(term.read_shape) if dim != channel] != others for term in expr.terms):
        raise NotLinear  # a reshape inside the region (a channel-last view): its terms read another layout
    terms, seen = [], []
    for term in expr.terms:
        term, through = _see_through(term, node, expr)
        seen += [through] if through is not None else []
        layout = [(term.layout or range(rank))[dim] for dim in perm]
        try:
            form = pointwise_at_rank(term.form, 0 if moved_to == rank - 1 else rank - 2)
        except NotExact:
            if through is None:
                raise NotLinear  # a spatial op before a lone permute: it stays a layout change
            raise
        terms.append(replace(term, form=form, layout=None if layout == list(range(rank)) else tuple(layout)))
    if any(term.layout is not None for term in terms) and not any(_may_merge(an, user) for user in node.users):
        raise NotLinear  # a permute that stays, and no op after it to merge with: the region ends before it
    return an.relayout(node, expr, terms, seen, channel_last=moved_to == rank - 1)


# Ops that copy or re-view a tensor (and so merge with no form): a permute only they read ends its region.
_COPIES_AND_VIEWS = (aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default,
                     aten._to_copy.default, aten.view.default, aten._unsafe_view.default, aten.reshape.default,
                     aten.flatten.using_ints)


def _may_merge(an: Analyzer, user: fx.Node) -> bool:
    """Whether ``user`` is an op of the region algebra that computes something (not a copy or a view)."""
    return user.target in an.rules and user.target not in _COPIES_AND_VIEWS


def _see_through(term: Term, node: fx.Node, expr: Expr) -> tuple[Term, fx.Node | None]:
    """``term`` reading the source of the permute it reads, when only this region reads that permute
    (so ``P^-1(f(P(s)))`` leaves no permute); else as it is."""
    source = term.source
    perm = _permutation(source) if term.inner is None else None
    if perm is None or any(user is not node and user not in expr.ops for user in source.users):
        return term, None
    layout = [perm[dim] for dim in (term.layout or range(len(perm)))]
    return replace(term, source=source.args[0], layout=tuple(layout)), source


def _undoes(an: Analyzer, node: fx.Node, operand: Operand, expr: Expr, channel_last: bool) -> Expr | None:
    """``P^-1(f(P(s)))`` with nothing else reading ``P(s)``: ``f`` on ``s``'s own channel dim, applied to
    ``s``'s expression (absorbed as any operand is), so ``f`` merges into the region before ``P``.
    None when ``expr`` is no such ``f``."""
    term, through = _see_through(expr.terms[0], node, expr)
    if through is None or term.layout != tuple(_permutation(node).index(dim) for dim in range(len(term.layout))):
        return None
    form = pointwise_at_rank(term.form, 0 if channel_last else len(term.layout) - 2)
    # The ops between are priced where they stand; the permutations are views.
    return an.apply(form, operand(term.source, channel_last), node, extra_ops=(*expr.ops, through),
                    channel_last=channel_last, view=True)


def _undone(an: Analyzer, node: fx.Node, operand: Operand, inner: fx.Node) -> Expr:
    """``P^-1(P(s))`` with nothing between: ``s``'s own expression, the two permutes joining its region."""
    if any(user is not node for user in inner.users):
        raise NotLinear  # P(s) is read outside the pair: it is a tensor of its own
    source = inner.args[0]
    before = an.result.exprs.get(source)
    expr = operand(source, before is not None and before.channel_last)
    if not expr.ops:
        raise NotLinear  # s itself, re-laid out: nothing linear to fold
    return expr.joined(inner, node)
