"""Rule: convolution (1-D/2-D/3-D, any groups, stride, dilation, ``padding='same'``) as a ``ConvForm``.

``aten.convolution`` is also how a TorchScript conversion (and some hand-written
graphs) spell a transposed convolution (``transposed=True``): that call gets the
form ``conv_transpose.py`` gives ``conv_transpose*``, so it folds the same way.
``padding='same'`` with an even kernel pads asymmetrically, which no zero-padded
convolution reproduces, so it is refused with that reason.
"""

from __future__ import annotations

import torch
from torch import fx

from repfx.passes.algebra.forms import ConvForm, NotExact
from repfx.passes.regions.analyzer import Analyzer, Expr, NotLinear, Operand, as_ints, rule
from repfx.passes.regions.rules.conv_transpose import apply_transposed

aten = torch.ops.aten


@rule(aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
      aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding, aten.convolution.default)
def convolution(an: Analyzer, node: fx.Node, operand: Operand) -> Expr:
    """The convolution applied to its input's expression; arguments export left out take their defaults."""
    op = an.arguments(node)
    x, stride, padding = op["input"], op["stride"], op["padding"]
    if op.get("transposed"):
        return apply_transposed(an, node, operand, x, op["weight"], op["bias"], stride, padding, op["output_padding"],
                                op["dilation"], op["groups"])
    w = an.weight(node, op["weight"])
    b = None if op["bias"] is None else an.weight(node, op["bias"], "bias")
    rank = w.dim() - 2
    if not isinstance(x, fx.Node) or x.meta["val"].dim() != rank + 2:
        raise NotLinear  # unbatched input: dim 1 is not the channel dim
    dilation = as_ints(op["dilation"], rank)
    if isinstance(padding, str):
        if padding == "valid":
            padding = 0
        elif any(((k - 1) * d) % 2 for k, d in zip(w.shape[2:], dilation)):
            raise NotExact("padding", f"{node.name}: padding='same' with an even kernel pads asymmetrically")
        else:
            padding = [(k - 1) * d // 2 for k, d in zip(w.shape[2:], dilation)]
    form = ConvForm.convolution(w, b, as_ints(stride, rank), as_ints(padding, rank), dilation, int(op["groups"]))
    return an.apply(form, operand(x), node)
