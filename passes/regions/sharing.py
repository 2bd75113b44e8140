"""Weights read by several ops (a module called twice): each use folds on its own, into new weights.

Folding never writes a tensor it reads: emission registers fresh parameters for
every op it writes, and a parameter leaves the graph only when no node reads it any
more. So a use of a shared conv, BN or linear can fold like any other op; the other
uses keep reading the original. Two consequences are the cost of that freedom:

* a use that merges with nothing (the shared op alone, carried into a region through
  a sum or an identity op) would be emitted as a copy of itself: the weight doubles and
  no op is saved. ``copy_only_uses`` finds such uses; the fold makes them boundaries,
  with ``only_copies`` as the reason.
* a use that does merge, while another use stays, leaves both the original and the
  folded weights in the model. ``copied_weights`` names them after the fold, for the
  report (``copy_note``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from torch import fx

from repfx.passes.constants import ConstantFolder

if TYPE_CHECKING:
    from repfx.passes.regions.analyzer import Expr


def shared_with(node: fx.Node, arg: Any, what: str, constants: ConstantFolder) -> str:
    """``"weight w (also read by conv_1)"`` when ops other than ``node`` read the constant ``arg``, else ``""``.

    Constant ops reading it (a scale the graph computes from BN statistics) are not uses:
    they are folded where they are read.
    """
    if not isinstance(arg, fx.Node):
        return ""
    others = [user.name for user in arg.users if user is not node and not constants.is_constant(user)]
    name = arg.target if arg.op == "get_attr" else arg.name  # a parameter by the name the model gives it
    return f"{what} {name} (also read by {', '.join(others)})" if others else ""


def only_copies(op: fx.Node, consumer: fx.Node, shared: Iterable[str]) -> str:
    """Why the shared ``op`` is not merged into ``consumer``."""
    return (f"{op.name} reads {'; '.join(shared)}: merging it into {consumer.name} would only re-emit it "
            "with copied weights, saving no op; left as written")


def copy_only_uses(regions: Iterable[tuple[fx.Node, Expr]]) -> set[fx.Node]:
    """Shared ops that some region would emit unchanged (the term is the op alone, not the region's root).

    A region rooted at the op itself is a lone op: it is not rewritten at all.
    """
    return {term.shared for root, expr in regions for term in expr.terms
            if term.shared is not None and term.shared is not root}


def constant_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes that depend on no graph input: ``get_attr`` and ops on such nodes only (one pass, in graph order)."""
    constant: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr" or (node.op == "call_function" and all(arg in constant
                                                                         for arg in node.all_input_nodes)):
            constant.add(node)
    return constant


def constants_read(ops: Iterable[fx.Node], constant: set[fx.Node]) -> set[str]:
    """Targets of the ``get_attr`` nodes ``ops`` read, directly or through constant ops (``constant_nodes``)."""
    ops = set(ops)
    found: set[str] = set()
    pending = [arg for op in ops for arg in op.all_input_nodes if arg in constant and arg not in ops]
    seen: set[fx.Node] = set()
    while pending:
        node = pending.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "get_attr":
            found.add(node.target)
        else:
            pending.extend(node.all_input_nodes)  # all constant, by construction
    return found


def copied_weights(gm: fx.GraphModule, read: set[str]) -> list[str]:
    """Of the constants a committed rewrite read, those the graph still reads (other uses kept them)."""
    alive = {node.target for node in gm.graph.nodes if node.op == "get_attr"}
    return sorted(read & alive)


def copy_note(weights: list[str], parameters: int) -> str:
    """The report's line for a rewrite that folded a use of a shared weight while other uses keep it."""
    return (f"shared weight: this use was folded into new weights ({parameters:,} parameters) while other "
            f"ops still read {', '.join(weights)}, unchanged; the model holds both")
