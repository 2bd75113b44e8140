"""Pass: replace ``reshape_as(a, b)`` / ``view_as(a, b)`` by a reshape to ``b``'s static shape.

``b`` is read only for its shape, but as a graph edge it counts as a second use
of ``b``, which blocks folding ``b`` into its real consumer (timm's LinearNorm:
``bn(linear(x).flatten(0, 1)).reshape_as(linear(x))``). With a static shape the
edge is not needed; with a symbolic one the node is left as it is.
"""

from __future__ import annotations

import torch
from torch import fx

aten = torch.ops.aten
_SHAPE_ONLY = (aten.reshape_as.default, aten.view_as.default)


def reshape_as_to_static_shape(gm: fx.GraphModule) -> bool:
    """Rewrite ``gm`` in place; returns whether anything changed."""
    modified = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _SHAPE_ONLY:
            continue
        source, like = node.args[:2]
        value = like.meta.get("val") if isinstance(like, fx.Node) else None
        if not isinstance(value, torch.Tensor) or not all(isinstance(size, int) for size in value.shape):
            continue  # symbolic shape: the edge carries it
        with gm.graph.inserting_before(node):
            reshaped = gm.graph.call_function(aten.reshape.default, (source, list(value.shape)))
        reshaped.meta.update(node.meta)
        node.replace_all_uses_with(reshaped)
        gm.graph.erase_node(node)
        modified = True
    if modified:
        gm.recompile()
    return modified
