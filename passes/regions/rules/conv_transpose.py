"""Rule: transposed convolution (``ConvTranspose1d/2d/3d``: ``aten.conv_transpose{1,2,3}d``).

Its form is a ``TransposedConvForm`` (``algebra/transposed.py``), or a plain
``ConvForm`` when the op is a forward convolution in disguise (stride 1, no
output_padding, padding within the kernel's reach). So a BatchNorm, a scale or a
1x1 conv after it folds into it, a per-channel scale before it too; a shift before
it, a spatial kernel around it and sums with other branches are refused with the
reason ``forms``/``transposed`` give. ``aten.convolution(transposed=True)`` (what a
TorchScript conversion writes) is read by ``conv.py``, which owns that target, into
the same form.
"""

from __future__ import annotations

import torch
from torch import fx

from repfx.passes.algebra.transposed import transposed_form
from repfx.passes.regions.analyzer import Analyzer, Expr, NotLinear, Operand, as_ints, rule

aten = torch.ops.aten


@rule(aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input)
def conv_transpose(an: Analyzer, node: fx.Node, operand: Operand) -> Expr:
    """The transposed convolution applied to its input's expression (arguments by name, defaults filled in)."""
    op = an.arguments(node)
    return apply_transposed(an, node, operand, op["input"], op["weight"], op["bias"], op["stride"], op["padding"],
                            op["output_padding"], op["dilation"], op["groups"])


def apply_transposed(an: Analyzer, node: fx.Node, operand: Operand, x, weight, bias, stride, padding, output_padding,
                     dilation, groups) -> Expr:
    """The transposed convolution with these arguments applied to ``x``'s expression (also ``conv.py``'s, for
    ``convolution(transposed=True)``)."""
    w = an.weight(node, weight)
    b = None if bias is None else an.weight(node, bias, "bias")
    rank = w.dim() - 2
    if not isinstance(x, fx.Node) or x.meta["val"].dim() != rank + 2:
        raise NotLinear  # unbatched input: dim 1 is not the channel dim
    geometry = [as_ints(value, rank) for value in (stride, padding, output_padding, dilation)]
    return an.apply(transposed_form(w, b, *geometry, int(groups)), operand(x), node)
