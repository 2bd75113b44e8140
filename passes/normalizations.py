"""Find normalizations of a tensor by its own statistics: a LayerNorm, GroupNorm, RMSNorm or softmax written out.

``x - mean(x)``, ``/ sqrt(var + eps)``: each op is linear or elementwise alone, but the
statistic is computed from the very tensor it normalizes, so the whole is not linear and
none of its ops is a merge to refuse. ``kept_ops`` names these ops once, as a
normalization, instead of reporting the refusals the analysis met inside them
("channel mismatch: 1 channels into an op expecting 8").
"""

from __future__ import annotations

from torch import fx

from repfx.passes.dataflow import is_view

# Reductions whose result, broadcast back onto the tensor they reduce, normalizes it (LayerNorm, GroupNorm, softmax).
_STATISTICS = {"mean", "var", "std", "var_mean", "std_mean", "sum", "amax", "amin", "logsumexp"}
_ON_STATISTICS = {"add", "sub", "rsub", "mul", "div", "sqrt", "rsqrt", "reciprocal", "pow", "clamp", "clamp_min",
                  "neg", "exp", "log", "getitem", "expand", "_to_copy"}  # what carries a statistic on (``var + eps``)


def op_name(node: fx.Node) -> str:
    """``aten.batch_norm.default`` -> ``batch_norm``; ``aten.relu_.default`` -> ``relu`` (in place or not)."""
    name = getattr(node.target, "__name__", str(node.target)).split(".")[0]
    return name[:-1] if name.endswith("_") and not name.endswith("__") else name


def normalizations(gm: fx.GraphModule, free: set[fx.Node]) -> set[fx.Node]:
    """The ops of every normalization of a tensor by its own statistics (``free``: the nodes no input reaches).

    A statistic is a reduction of a tensor (``mean``, ``var``, ``amax``...), or an
    elementwise op or view of statistics and constants alone (``var + eps``, ``sqrt``). A
    normalizer combines a tensor with a statistic computed from that tensor, or from
    what a normalizer made of it (``x - mean(x)``, ``(x - u) / sqrt(var + eps)``), broadcast
    back over the reduced dims (a sum of stacked branches added to its input is no
    normalization). The ops of a normalization are its normalizers and the statistics they read.
    """
    order = {node: index for index, node in enumerate(gm.graph.nodes)}
    statistics: set[fx.Node] = set()
    ops: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op != "call_function" or node in free:
            continue
        varying = [arg for arg in node.all_input_nodes if arg not in free]
        name = op_name(node)
        if name in _STATISTICS or (varying and (name in _ON_STATISTICS or is_view(node))
                                   and all(arg in statistics for arg in varying)):
            statistics.add(node)
            continue
        stats = [arg for arg in varying if arg in statistics and _shape(arg) != _shape(node)]  # broadcast back
        tensors = [arg for arg in varying if arg not in statistics]
        if stats and any(tensor in ops or _computed_from(stat, tensor, order) for tensor in tensors for stat in stats):
            ops.add(node)
            ops |= _statistics_above(stats, statistics)
    return ops


def _computed_from(node: fx.Node, tensor: fx.Node, order: dict[fx.Node, int]) -> bool:
    """Whether ``node`` reads ``tensor``, directly or not (walking back no further than ``tensor``)."""
    seen, todo = {node}, [node]
    while todo:
        for arg in todo.pop().all_input_nodes:
            if arg is tensor:
                return True
            if arg not in seen and order.get(arg, -1) > order[tensor]:
                seen.add(arg)
                todo.append(arg)
    return False


def _statistics_above(stats: list[fx.Node], statistics: set[fx.Node]) -> set[fx.Node]:
    """``stats`` and the statistics they are computed from (``sqrt(var + eps)``: the sqrt, the add, the var)."""
    seen, todo = set(stats), list(stats)
    while todo:
        for arg in todo.pop().all_input_nodes:
            if arg in statistics and arg not in seen:
                seen.add(arg)
                todo.append(arg)
    return seen


def _shape(node: fx.Node) -> tuple | None:
    value = node.meta.get("val")
    return tuple(value.shape) if hasattr(value, "shape") else None
