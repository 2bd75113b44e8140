"""Rule: transposed convolution (``ConvTranspose1d/2d/3d``: ``aten.conv_transpose{1,2,3}d``).

Its form is a ``TransposedConvForm`` (``algebra/transposed.py``), or a plain
``ConvForm`` when the op is a forward convolution in disguise (stride 1, no
output_padding, padding within the kernel's reach). So a BatchNorm, a scale or a
1x1 conv after it folds into it, a per-channel scale before it too; a shift before
it, a spatial kernel around it and sums with other branches are refused with the
reason ``forms``/``transposed`` give. ``aten.convolution(transposed=True)`` (what a
TorchScript conversion writes) is left to ``conv.py``, which owns that target.
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
    arguments = node.normalized_arguments(an.gm, normalize_to_only_use_kwargs=True)
    if arguments is None:
        raise NotLinear  # not a call torch.fx can match to the op's schema
    op = arguments.kwargs
    w = an.weight(node, op["weight"])
    b = None if op["bias"] is None else an.weight(node, op["bias"], "bias")
    rank = w.dim() - 2
    if not isinstance(op["input"], fx.Node) or op["input"].meta["val"].dim() != rank + 2:
        raise NotLinear  # unbatched input: dim 1 is not the channel dim
    geometry = [as_ints(op[name], rank) for name in ("stride", "padding", "output_padding", "dilation")]
    form = transposed_form(w, b, *geometry, int(op["groups"]))
    return an.apply(form, operand(op["input"]), node)
