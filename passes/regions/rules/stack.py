"""Rule: branches summed or averaged through a stack (``torch.stack([...]).sum(0)`` / ``.mean(0)``).

Reducing a stack over the stacked dim adds its tensors element by element, so it
is a sum of branches like ``a + b + c`` (a mean is that sum times exactly ``1/n``).
A reduction over any other dim mixes values of one branch (pixels, channels or
samples): it is no sum of branches and is reported as such.
"""

from __future__ import annotations

import torch
from torch import fx

from repfx.passes.algebra.forms import ConvForm, NotExact
from repfx.passes.regions.analyzer import Analyzer, Expr, NotLinear, Operand, rule

aten = torch.ops.aten


@rule(aten.sum.dim_IntList, aten.mean.dim)
def stacked_sum(an: Analyzer, node: fx.Node, operand: Operand) -> Expr:
    """``stack(tensors, d).sum(d)`` is ``tensors[0] + tensors[1] + ...``; ``mean(d)`` divides it by their count."""
    op = an.arguments(node)
    stacked, dims = op["input"], op["dim"]
    if not isinstance(stacked, fx.Node) or stacked.target is not aten.stack.default:
        raise NotLinear  # a reduction of one tensor: no branches
    if op["keepdim"] or op["dtype"]:
        raise NotLinear  # keeps the stacked dim or casts: another shape or dtype than the branches
    tensors = an.arguments(stacked)["tensors"]
    rank = stacked.meta["val"].dim()
    stack_dim = an.arguments(stacked)["dim"] % rank
    reduced = sorted({dim % rank for dim in ([dims] if isinstance(dims, int) else (dims or range(rank)))})
    if reduced != [stack_dim]:
        raise NotExact("reduction", f"{node.name} reduces dims {reduced} of {stacked.name}, not only its stacked dim {stack_dim}: "
                       "not a sum of the stacked branches")
    others = [user.name for user in stacked.users if user is not node]
    if others:
        raise NotExact("shared-output", f"{stacked.name} is also read by {', '.join(others)}; its branches are not merged here")
    exprs = {t: an.result.exprs.get(t) for t in tensors if isinstance(t, fx.Node)}
    cl = node.meta["val"].dim() > 2 and any(expr is not None and expr.channel_last for expr in exprs.values())
    total = an.add(node, [operand(t, cl) for t in tensors], tensors, cl)
    total = total.joined(stacked)
    if node.target is aten.mean.dim:
        count = len(tensors)
        scale = torch.full((total.shape[0],), 1.0 / count, dtype=torch.float64)
        mean = ConvForm.affine(scale, torch.zeros_like(scale), len(total.shape) - 1)
        return an.apply(mean, total, node, channel_last=cl)
    return total
