"""Rule: per-channel ops between a transpose (or permute) and its inverse.

Token models apply ``BatchNorm1d`` to ``[B, N, C]`` tokens as
``bn(x.transpose(1, 2)).transpose(1, 2)``; channels-last models write
``bn2d(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)``. A pointwise op (BN, a scale, a
1x1 conv) mixes channels pixel by pixel, so it commutes with any rearrangement of
the other dims: between a permutation ``P`` and its inverse it is the same op on the
dim of the untransposed tensor that ``P`` moved to its channel dim. When that is the
last dim (tokens, channels-last) it is what a linear region there computes; when it
is dim 1, a 1x1 convolution (so a linear between transposes of a conv1d's output is
a 1x1 conv). The pair then folds into the region around it (``linear -> transpose
-> BN -> transpose`` becomes one linear). An op that reads neighbouring pixels
between the two is refused with that reason; a lone transpose is a layout change,
no region.
"""

from __future__ import annotations

import torch
from torch import fx

from repfx.passes.algebra.forms import pointwise_at_rank
from repfx.passes.regions.analyzer import Analyzer, Expr, NotLinear, Operand, rule

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
def undo_permutation(an: Analyzer, node: fx.Node, operand: Operand) -> Expr:
    """``P^-1(f(P(s)))`` for a pointwise ``f``: ``f`` on ``s``'s own channel dim."""
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor) or value.dim() < 3:
        raise NotLinear
    middle = node.args[0]
    known = an.result.exprs.get(middle)
    if known is not None and known.grid is not None:
        raise NotLinear  # partitions (a reshaped map): a permutation moves values between rows
    if known is not None and len(known.terms) == 1 and _inverse_pair(node, known.terms[0].source):
        inner = known.terms[0].source  # P(s) -> pointwise ops -> node
        mid = operand(middle, known.channel_last)
        if mid.terms[0].source is not inner:
            raise NotLinear  # the ops between are read elsewhere too (reported by ``operand``)
    elif _inverse_pair(node, middle):
        inner, mid = middle, None  # P^-1(P(s)) is s
    else:
        raise NotLinear  # a layout change
    if any(user is not node and (mid is None or user not in mid.ops) for user in inner.users):
        raise NotLinear  # P(s) is read outside the pair: it is a tensor of its own
    source = inner.args[0]
    if mid is None:
        before = an.result.exprs.get(source)
        expr = operand(source, before is not None and before.channel_last)
        if not expr.ops:
            raise NotLinear  # s itself, re-laid out: nothing linear to fold
        return expr.joined(inner, node)
    last = value.dim() - 1
    source_channel = _permutation(inner)[last if mid.channel_last else 1]  # the dim of s the ops between act on
    if source_channel not in (1, last):
        raise NotLinear  # neither s's channel dim nor its last dim: no form on s acts there
    channel_last = source_channel == last
    form = pointwise_at_rank(mid.terms[0].form, 0 if channel_last else last - 1)
    # The ops between are priced where they stand; the permutations are views.
    return an.apply(form, operand(source, channel_last), node, extra_ops=(*mid.ops, inner), channel_last=channel_last,
                    view=True)
