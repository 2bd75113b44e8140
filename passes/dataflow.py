"""What a value is computed from: a node's ancestry, the nodes no graph input reaches, ops that only view.

Two passes ask these questions of a graph: ``parameter_subgraphs`` (which values are
made of parameters alone, to store them once) and ``kept_ops`` (which of those still run,
and what a kept op is a view of). Plain walks over ``torch.fx`` nodes, no state.
"""

from __future__ import annotations

from torch import fx


def ancestry(node: fx.Node) -> set[fx.Node]:
    """``node`` and every node it reads, directly or not."""
    seen, todo = {node}, [node]
    while todo:
        for arg in todo.pop().all_input_nodes:
            if arg not in seen:
                seen.add(arg)
                todo.append(arg)
    return seen


def input_free(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes no graph input reaches: parameters, buffers, constants and what the graph computes from them alone."""
    free: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr" or (node.op == "call_function" and all(arg in free for arg in node.all_input_nodes)):
            free.add(node)
    return free


def is_view(node: fx.Node) -> bool:
    """The op returns a view of its input (``select``, ``t``, ``view``, ``permute``): it computes nothing."""
    returns = getattr(getattr(node.target, "_schema", None), "returns", ())
    return bool(returns) and all(ret.alias_info is not None for ret in returns)
