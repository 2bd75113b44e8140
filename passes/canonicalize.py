"""Passes that rewrite spellings of one value that the fold would take for different tensors.

* ``reshape_as_to_static_shape``: ``reshape_as(a, b)`` / ``view_as(a, b)`` become a
  reshape to ``b``'s static shape. ``b`` is read only for its shape, but as a graph
  edge it counts as a second use of ``b``, which blocks folding ``b`` into its real
  consumer (timm's LinearNorm: ``bn(linear(x).flatten(0, 1)).reshape_as(linear(x))``).
  With a symbolic shape the node is left as it is.
* ``see_through_value_aliases``: ``x.detach()``, ``x.clone()``, ``x.contiguous()``,
  ``x.to(x.dtype)`` (``detach``, ``alias``, ``clone``, ``contiguous``, ``_to_copy``,
  ``to``, eval ``dropout``) are ``x``: same values, dtype, device, layout, shape and
  strides. Branches reading ``x`` through such an op read ``x``, but the fold only
  merges branches of one node; so where ops a region can hold (ops with a rule) read
  both ``x`` and the alias, the alias's readers among them are rerouted to ``x``. Other
  readers keep the copy (``relu(x.clone())`` may then run in place). An op that
  changes anything of the above (a cast, a ``channels_last`` copy, the layout copy
  ``contiguous()`` makes of a transposed tensor, which a later ``view`` needs) is a
  tensor of its own and stays. So does a copy the graph returns (an output is never
  an alias of another) and one next to an in-place op (there a copy protects its source).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import fx

from repfx.passes.regions.analyzer import registered_rules

aten = torch.ops.aten
_SHAPE_ONLY = (aten.reshape_as.default, aten.view_as.default)
_VALUE_ALIASES = (aten.detach.default, aten.alias.default, aten.clone.default, aten.contiguous.default,
                  aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.dropout.default)


def reshape_as_to_static_shape(gm: fx.GraphModule) -> bool:
    """Rewrite ``gm`` in place; returns whether anything changed."""
    return _rewrite_each_node(gm, _static_reshape)


def see_through_value_aliases(gm: fx.GraphModule) -> bool:
    """Reroute the readers of every value alias to the tensor it aliases; returns whether anything changed."""
    return _rewrite_each_node(gm, _see_through)


def _rewrite_each_node(gm: fx.GraphModule, rewrite: Callable[[fx.GraphModule, fx.Node], bool]) -> bool:
    modified = False
    for node in list(gm.graph.nodes):
        modified |= rewrite(gm, node)
    if modified:
        gm.recompile()
    return modified


def _static_reshape(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op != "call_function" or node.target not in _SHAPE_ONLY:
        return False
    source, like = node.args[:2]
    value = like.meta.get("val") if isinstance(like, fx.Node) else None
    if not isinstance(value, torch.Tensor) or not all(isinstance(size, int) for size in value.shape):
        return False  # symbolic shape: the edge carries it
    with gm.graph.inserting_before(node):
        reshaped = gm.graph.call_function(aten.reshape.default, (source, list(value.shape)))
    reshaped.meta.update(node.meta)
    node.replace_all_uses_with(reshaped)
    gm.graph.erase_node(node)
    return True


def _see_through(gm: fx.GraphModule, node: fx.Node) -> bool:
    if not is_value_alias(node) or _near_mutation(node) or not branches_could_meet(node):
        return False
    rules = registered_rules()
    readers = [user for user in node.users if user.op == "call_function" and user.target in rules]
    for reader in readers:
        reader.replace_input_with(node, node.args[0])
    if not node.users:
        gm.graph.erase_node(node)
    return bool(readers)


def branches_could_meet(alias: fx.Node) -> bool:
    """Whether an op a region can hold (one with a rule) reads ``alias`` and another reads its source:
    only then can a branch of each meet in one sum."""
    rules = registered_rules()
    source = alias.args[0]
    return (any(user.target in rules for user in alias.users if user.op == "call_function")
            and any(user is not alias and user.target in rules for user in source.users if user.op == "call_function"))


def is_value_alias(node: fx.Node) -> bool:
    """Whether ``node`` is its first argument again: an alias-like op whose result equals its
    input in values, dtype, device, layout, shape and strides (fake values, as capture records them)."""
    if node.op != "call_function" or node.target not in _VALUE_ALIASES or not node.args:
        return False
    if node.target is aten.dropout.default and node.args[2]:
        return False  # training-mode dropout is random
    source = node.args[0]
    before = source.meta.get("val") if isinstance(source, fx.Node) else None
    after = node.meta.get("val")
    if not isinstance(before, torch.Tensor) or not isinstance(after, torch.Tensor):
        return False
    return (before.dtype, before.device, before.layout) == (after.dtype, after.device, after.layout) and (
        str(tuple(before.shape)), str(before.stride())) == (str(tuple(after.shape)), str(after.stride()))


def _near_mutation(node: fx.Node) -> bool:
    """An in-place op reads the alias or its source: then which tensor is which matters."""
    readers = [*node.users, *node.args[0].users]
    return any(getattr(getattr(reader.target, "_schema", None), "is_mutable", False) for reader in readers)
