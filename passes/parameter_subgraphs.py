"""Pass: evaluate once, into plain weights, the subgraphs that read only parameters, buffers and constants.

A weight computed in ``forward`` (ECBSR's Sobel and Laplacian masks written into a zero
kernel, OREPA's generated kernels, DO-Conv's ``D^T W`` products, weight standardization
``(w - mean) / std``) is recomputed on every call although no input enters it. Each such
value that an op on the inputs reads becomes one stored constant (a ``get_attr``): the
convolution reading it is then a convolution like any other, and merges as one.

The value is computed in float64 and rounded once to the model's dtype; the float64
value stays on the new node (``constants.EXACT_META``), so the fold and the proof of a
fold read exactly what they read while it was a subgraph. Where the float64 value
differs from the model's own arithmetic by more than rounding (a rounding or a
comparison inside decided differently), the model's own value is stored instead.

Left as written, each named with its reason (code ``parameter-subgraph``): a subgraph with
a random op, an op with a side effect or an in-place write, a buffer the forward writes, a
value the graph returns (stored, the output would be the model's own tensor, which a
caller may write) and one that cannot be evaluated. A value that would hold more than
``max_param_growth`` elements per floating element of the parameters it is computed from
(LeViT's ``attention_biases[:, idxs]``: a table of offsets gathered into a full
heads x N x N bias) stays evaluated per call too (code ``param-growth``, with both sizes):
storing it trades model size for time, which the bound says is not wanted, as it says
for merges. Not touched: a subgraph of views alone
(``w.t()`` computes nothing) and a value made from literals alone (``torch.zeros(...)``
costs less to make than to store).
"""

from __future__ import annotations

from collections import Counter
from operator import attrgetter

import torch
from torch import fx, nn

from repfx.passes.constants import EXACT_META, ConstantFolder, float64_values, written_attributes
from repfx.passes.constants import _is_nondeterministic, _writes_into
from repfx.passes.dataflow import ancestry, input_free, is_view
from repfx.passes.emit import _unique_attr, remove_dead_code
from repfx.passes.fold import AppliedRewrite, PassResult, _is_executed, _kind
from repfx.passes.refusals import Refused


def fold_parameter_subgraphs(gm: fx.GraphModule, max_param_growth: float | None = None) -> PassResult:
    """Store every input-free value an input-dependent op (or the output) reads; rewrites ``gm`` in place.

    ``max_param_growth`` (None: no bound): the most elements a stored value may hold per floating
    element of the parameters its subgraph reads (the cost rule's bound, ``Settings.max_param_growth``).
    """
    exact, as_written = ConstantFolder(gm), ConstantFolder(gm, upcast=False)
    written = set(written_attributes(gm))
    free = input_free(gm)
    order = {node: index for index, node in enumerate(gm.graph.nodes)}
    result = PassResult(False)
    stored: list[tuple[fx.Node, list[fx.Node], tuple[int, ...]]] = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node not in free or all(user in free for user in node.users):
            continue  # read by inputs, or read only inside its subgraph (whose reader stores it)
        node = _below_views(node)  # views stay: free to run, and the fold reads a broadcast constant as one
        subgraph = list(ancestry(node))
        ops = sorted((op for op in subgraph if op.op == "call_function"), key=order.__getitem__)
        if not any(op.op == "get_attr" for op in subgraph) or all(is_view(op) for op in ops):
            continue  # literals alone, or views alone: nothing a parameter costs on each call
        reason = _kept_because(node, subgraph, written)
        value = None if reason else _value(node, exact, as_written)
        if value is None:
            result.refusals.append(Refused(node.name, "parameter-subgraph", f"{node.name} reads only parameters "
                                           f"and constants but is computed on every call: {reason or 'it cannot be evaluated'}"))
            continue
        growth = _param_growth(gm, node, subgraph, max_param_growth)
        if growth:
            result.refusals.append(Refused(node.name, "param-growth", growth))
            continue
        constant = _store(gm, node, *value)
        node.replace_all_uses_with(constant)
        stored.append((node, ops, tuple(constant.meta["val"].shape)))
    if stored:
        remove_dead_code(gm)
        result.modified = True
        result.rewrites = _rewrites(gm, stored)
    return result


def _below_views(node: fx.Node) -> fx.Node:
    """The value ``node`` is a view of (``w.view(1, -1, 1, 1).expand(n, ...)`` -> ``w``), when it is computed."""
    while is_view(node) and node.args and isinstance(node.args[0], fx.Node) and node.args[0].op == "call_function":
        node = node.args[0]
    return node


def _kept_because(node: fx.Node, subgraph: list[fx.Node], written: set[str]) -> str | None:
    """Why the subgraph must run on each call (None: it may be evaluated once)."""
    for op in subgraph:
        if op.op == "get_attr" and op.target in written:
            return f"it reads {op.target}, which the forward writes"
        if op.op != "call_function":
            continue
        if _is_nondeterministic(op.target):
            return f"{op.name} is random (new values on every call)"
        if op.is_impure() or getattr(getattr(op.target, "_schema", None), "is_mutable", False):
            return f"{op.name} has a side effect"
        if any(_writes_into(user, op) for user in op.users):
            return f"{op.name} is written in place"
    if any(user.op == "output" for user in node.users):
        return "the graph returns it (stored, the output would be the model's own tensor, which a caller may write)"
    return None


def _param_growth(gm: fx.GraphModule, node: fx.Node, subgraph: list[fx.Node], bound: float | None) -> str | None:
    """Why storing ``node``'s value holds too many elements for the parameters it is computed from (None: fine).

    Only floating elements count on both sides, as for merges (an index buffer is no weight a
    model is sized by): LeViT's int64 ``idxs`` gathering a small float table is pure growth.
    """
    value = node.meta.get("val")
    if bound is None or not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return None
    names = {op.target for op in subgraph if op.op == "get_attr"}
    tensors = (attrgetter(name)(gm) for name in names)
    before = sum(t.numel() for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point())
    after = value.numel()
    if not before or after <= bound * before:
        return None
    return (f"{node.name} reads only parameters and constants, but its value holds {after:,} elements for the "
            f"{before:,} of the parameters it is computed from ({after / before:.1f}x > max_param_growth={bound:g}); "
            "computed on every call")


def _value(node: fx.Node, exact: ConstantFolder, as_written: ConstantFolder) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The value to store (the model's dtype) and its float64 value, or None when it cannot be evaluated."""
    precise, model = exact.tensor(node), as_written.tensor(node)
    expected = node.meta.get("val")
    if precise is None or model is None or not isinstance(expected, torch.Tensor) or model.shape != expected.shape:
        return None
    rounded = precise.to(expected.dtype)
    if not rounded.is_floating_point():
        return rounded, rounded
    scale = max(1.0, model.abs().max().item()) if model.numel() else 1.0
    if model.numel() and (rounded.double() - model.double()).abs().max().item() > torch.finfo(rounded.dtype).eps ** 0.5 * scale:
        return model, float64_values(model)  # float64 decided a rounding or a comparison otherwise: keep the model's
    return rounded, float64_values(precise)


def _store(gm: fx.GraphModule, node: fx.Node, value: torch.Tensor, value64: torch.Tensor) -> fx.Node:
    """A ``get_attr`` of a new weight holding ``value``, placed where ``node`` was, its float64 value on it."""
    name = _unique_attr(gm, f"repfx_{node.name}")
    gm.register_parameter(name, nn.Parameter(value.to(memory_format=torch.contiguous_format, copy=True),
                                             requires_grad=False))
    with gm.graph.inserting_before(node):
        constant = gm.graph.get_attr(name)
    constant.meta.update({key: node.meta[key] for key in ("stack_trace", "nn_module_stack") if key in node.meta})
    constant.meta["val"] = getattr(gm, name)
    constant.meta[EXACT_META] = value64
    return constant


def _rewrites(gm: fx.GraphModule, stored: list[tuple[fx.Node, list[fx.Node], tuple[int, ...]]]) -> list[AppliedRewrite]:
    """One rewrite per stored value: the executed ops it removed (an op two stored values shared, by the first)."""
    remaining, claimed = set(gm.graph.nodes), set()
    rewrites = []
    for node, ops, shape in stored:
        removed = [op for op in ops if op not in remaining and op not in claimed and _is_executed(op)]
        claimed.update(removed)
        rewrites.append(AppliedRewrite(root=node.name, replaced_ops=tuple(op.name for op in removed),
                                       replaced_kinds=dict(Counter(_kind(op) for op in removed)),
                                       produced=(f"constant {list(shape)}",), kernel_shapes=(),
                                       ops_before=len(removed), ops_after=0))
    return rewrites
