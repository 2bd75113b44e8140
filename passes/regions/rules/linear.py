"""Rule: ``nn.Linear`` (``aten.linear``), a rank-0 ``ConvForm`` acting on the last dim.

Leading dims act as batch, so a region that starts at a linear reads its operand
channel-last; ``shape`` carries such regions across reshapes that keep the last dim.
"""

from __future__ import annotations

import torch
from torch import fx

from repfx.passes.algebra.forms import ConvForm
from repfx.passes.regions.analyzer import Analyzer, Expr, Operand, rule

aten = torch.ops.aten


@rule(aten.linear.default)
def linear(an: Analyzer, node: fx.Node, operand: Operand) -> Expr:
    """A linear layer mixes the last dim; any leading dims act as batch."""
    op = an.arguments(node)
    w = an.weight(node, op["weight"])
    b = None if op["bias"] is None else an.weight(node, op["bias"], "bias")
    form = ConvForm.convolution(w, b, (), (), (), 1)
    return an.apply(form, operand(op["input"], channel_last=True), node, channel_last=True)
