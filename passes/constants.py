"""Constant folding on demand: the value of a node that depends on no graph input.

Folding needs the numbers behind a node (a conv weight, BN running stats, a pad
value computed from BN parameters inside the graph as DBB does). A node is
constant when it is a ``get_attr`` or a deterministic call whose arguments are
all constant; its value is computed once and cached.

Computed constants are evaluated in float64 (parameters are upcast on the way in),
like the rest of the folding: DBB's pad value ``bias - mean * scale`` then equals the
BN shift the fold computes to float64 rounding, not merely to the model's fp32
rounding, so a float64 proof of the fold can hold it to a float64 bound. Ops that make
a floating tensor of a given dtype (``zeros``, ``full``, a cast) make it in float64 there.
Parameters themselves are returned as stored (no copies of every weight), except a constant
that ``parameter_subgraphs`` stored for a subgraph: its ``EXACT_META`` holds the float64
value the subgraph had, which is returned instead of the rounded one, as before it was stored.
``upcast=False`` evaluates as the model does, in its own dtypes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

_NOT_CONSTANT = object()
EXACT_META = "repfx_exact"  # on a get_attr a pass stored for a computed value: that value in float64


class ConstantFolder:
    def __init__(self, gm: fx.GraphModule, upcast: bool = True) -> None:
        self._gm = gm
        self._cache: dict[fx.Node, Any] = {}
        self._casts = (float64_values, _same) if upcast else (_same,)

    def value(self, arg: Any) -> Any:
        """The constant behind ``arg`` (node or literal), or None when it depends on inputs."""
        result = self._value(arg)
        return None if result is _NOT_CONSTANT else result

    def tensor(self, arg: Any) -> torch.Tensor | None:
        value = self.value(arg)
        return value if isinstance(value, torch.Tensor) else None

    def is_constant(self, arg: Any) -> bool:
        return self._value(arg) is not _NOT_CONSTANT

    def _value(self, arg: Any) -> Any:
        if not isinstance(arg, fx.Node):
            leaves = pytree.tree_leaves(arg)
            if any(isinstance(leaf, fx.Node) for leaf in leaves):
                mapped = pytree.tree_map_only(fx.Node, self._value, arg)
                return _NOT_CONSTANT if any(v is _NOT_CONSTANT for v in pytree.tree_leaves(mapped)) else mapped
            return arg
        if arg not in self._cache:
            self._cache[arg] = self._evaluate(arg)
        return self._cache[arg]

    def _evaluate(self, node: fx.Node) -> Any:
        if node.op == "get_attr":
            if any(_writes_into(user, node) for user in node.users):
                return _NOT_CONSTANT  # state the model updates as it runs (a counter, running stats)
            exact = node.meta.get(EXACT_META) if len(self._casts) > 1 else None
            return exact if exact is not None else _fetch_attr(self._gm, node.target)
        if node.op != "call_function" or _is_nondeterministic(node.target):
            return _NOT_CONSTANT
        if not all(self.is_constant(arg) for arg in node.all_input_nodes):
            return _NOT_CONSTANT  # decided without mapping the arguments (most nodes read an activation)
        args = self._value(node.args)
        kwargs = self._value(node.kwargs)
        if args is _NOT_CONSTANT or kwargs is _NOT_CONSTANT:
            return _NOT_CONSTANT
        with torch.no_grad():
            for cast in self._casts:
                try:
                    return node.target(*cast(args), **_made_in(node, cast(kwargs), cast))
                except Exception:  # an op without float64 support runs in the model's dtype; failing that,
                    continue       # an op that cannot run eagerly on its constants is simply not folded
            return _NOT_CONSTANT


def written_attributes(gm: fx.GraphModule) -> list[str]:
    """Parameters and buffers the graph writes as it runs (``self.step += 1``, running statistics).

    Running the graph advances them, so anything that runs it for checking must run it on copies.
    """
    written = [node.target for node in gm.graph.nodes
               if node.op == "get_attr" and any(_writes_into(user, node) for user in node.users)]
    return list(dict.fromkeys(written))


def float64_values(value: Any) -> Any:
    """``value`` with every floating tensor upcast to float64 (the precision folding and its proofs use)."""
    return pytree.tree_map_only(torch.Tensor, lambda t: t.double() if t.is_floating_point() else t, value)


def _same(value: Any) -> Any:
    return value


def _made_in(node: fx.Node, kwargs: dict, cast: Any) -> dict:
    """``kwargs``, asking an op that makes a floating tensor of a dtype (``zeros``, ``_to_copy``) for float64
    when the arguments are upcast: otherwise ``zeros`` would round what is written into it back to float32."""
    value = node.meta.get("val")
    arguments = getattr(getattr(node.target, "_schema", None), "arguments", ())
    if cast is _same or not isinstance(value, torch.Tensor) or not value.is_floating_point() or not any(
            argument.name == "dtype" and argument.kwarg_only for argument in arguments):
        return kwargs
    return {**kwargs, "dtype": torch.float64}


def attribute(gm: torch.nn.Module, target: str) -> Any:
    """What a ``get_attr`` of ``target`` reads, as it is stored (a parameter stays a parameter)."""
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _fetch_attr(gm: fx.GraphModule, target: str) -> Any:
    value = attribute(gm, target)
    return value.detach() if isinstance(value, torch.Tensor) else value


def _writes_into(user: fx.Node, tensor: fx.Node) -> bool:
    """Whether ``user`` mutates ``tensor`` (``copy_``/``add_``... with it as the written argument)."""
    schema = getattr(user.target, "_schema", None)
    if schema is None:
        return False
    for argument, value in zip(schema.arguments, user.args):
        if value is tensor and argument.alias_info is not None and argument.alias_info.is_write:
            return True
    return False


def _is_nondeterministic(target: Any) -> bool:
    tags = getattr(target, "tags", ())
    return torch.Tag.nondeterministic_seeded in tags
