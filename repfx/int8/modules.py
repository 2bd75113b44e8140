"""Re-emit a plain GraphModule's convolutions and linears as ``nn.Conv*`` / ``nn.Linear`` submodules.

Module-based quantizers (ModelOpt's ``modelopt.torch.quantization.quantize``, torch-tensorrt's INT8
route built on it, torchao's quantizers) find what to quantize by module type or ``nn_module_stack``.
repfx's plain graph computes its folded convolutions as aten calls on ``get_attr`` weights, so those
tools see no convolution and quantize nothing ("no weight quantizer is enabled"). ``with_modules``
returns a copy where each such call is ``call_module`` of an ``nn.Conv1d/2d/3d`` or ``nn.Linear``
holding the same tensors: the module's forward is the same aten call, so the numbers are identical.
Calls the modules cannot express (transposed convolutions, string padding, computed weights) stay.
"""

from __future__ import annotations

import copy

import torch
from torch import fx, nn

from repfx.pipeline.graph import REPORT_ATTRIBUTE, attach

aten = torch.ops.aten
CONVOLUTIONS = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default)
CONV_MODULES = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}


def with_modules(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` whose convolution / linear calls on ``get_attr`` weights are submodules; ``gm`` is untouched."""
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"with_modules takes a torch.fx.GraphModule, got {type(gm).__name__}")
    report = getattr(gm, REPORT_ATTRIBUTE, None)
    result = copy.deepcopy(gm)
    uses = _attribute_uses(result.graph)
    for node in list(result.graph.nodes):
        module = _as_module(result, node)
        if module is None:
            continue
        attributes = [attribute for attribute in (node.args[1], _bias(node)) if attribute is not None]
        name, replaces_holder = _module_name(result, attributes, uses)
        if replaces_holder:  # the bare module fx made to hold exactly these tensors: the new module takes its place
            parent, _, child = name.rpartition(".")
            delattr(result.get_submodule(parent), child)
        result.add_submodule(name, module)
        with result.graph.inserting_before(node):
            call = result.graph.call_module(name, (node.args[0],))
        call.meta.update(node.meta)
        stack = dict(node.meta.get("nn_module_stack", {}))
        stack[name] = (name, f"{type(module).__module__}.{type(module).__qualname__}")
        call.meta["nn_module_stack"] = stack
        node.replace_all_uses_with(call)
        result.graph.erase_node(node)
        for attribute in attributes:
            if not attribute.users:
                result.graph.erase_node(attribute)
                if not replaces_holder:
                    _forget(result, attribute.target, uses)
    result.graph.lint()
    result.recompile()
    if report is not None:
        attach(result, report)
    return result


def _attribute_uses(graph: fx.Graph) -> dict[str, int]:
    uses: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            uses[node.target] = uses.get(node.target, 0) + 1
    return uses


def _bias(node: fx.Node) -> fx.Node | None:
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return bias if isinstance(bias, fx.Node) else None


def _constant(gm: fx.GraphModule, node: object) -> torch.Tensor | None:
    """The tensor a ``get_attr`` node reads, or None for anything else."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    owner, _, name = node.target.rpartition(".")
    value = getattr(gm.get_submodule(owner) if owner else gm, name, None)
    return value if isinstance(value, torch.Tensor) else None


def _as_module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The module computing ``node`` exactly, or None when it is no convolution/linear a module can hold."""
    if node.op != "call_function" or node.kwargs:
        return None  # exporters pass these positionally; keyword calls are left as they are
    weight = _constant(gm, node.args[1]) if len(node.args) > 1 else None
    bias_node = node.args[2] if len(node.args) > 2 else None
    bias = _constant(gm, bias_node)
    if weight is None or (bias_node is not None and bias is None):
        return None  # a computed weight or bias: no parameter to hold
    if node.target == aten.linear.default and weight.dim() == 2:
        module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    elif node.target in CONVOLUTIONS and weight.dim() in CONV_MODULES:
        options = _conv_options(node, weight.dim() - 2)
        if options is None:
            return None
        module = CONV_MODULES[weight.dim()](weight.shape[1] * options["groups"], weight.shape[0],
                                            tuple(weight.shape[2:]), bias=bias is not None, device="meta",
                                            **options)
    else:
        return None
    module.weight = _parameter(weight)
    if bias is not None:
        module.bias = _parameter(bias)
    return module


def _conv_options(node: fx.Node, dims: int) -> dict | None:
    """stride/padding/dilation/groups of an aten convolution, or None for what ``nn.Conv*d`` cannot express."""
    if node.target == aten.convolution.default:
        _, _, _, stride, padding, dilation, transposed, _, groups = node.args
        if transposed:
            return None
    else:
        defaults = ([1] * dims, [0] * dims, [1] * dims, 1)
        given = list(node.args[3:7])
        stride, padding, dilation, groups = given + list(defaults[len(given):])
    if isinstance(padding, str) or not all(isinstance(v, int) for v in (*stride, *padding, *dilation, groups)):
        return None

    def expand(values: list[int]) -> tuple[int, ...]:
        return tuple(values) * dims if len(values) == 1 else tuple(values)

    return {"stride": expand(stride), "padding": expand(padding), "dilation": expand(dilation), "groups": groups}


def _parameter(tensor: torch.Tensor) -> nn.Parameter:
    """The same tensor as a parameter (shared storage, nothing copied)."""
    return tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor, requires_grad=False)


def _module_name(gm: fx.GraphModule, attributes: list[fx.Node], uses: dict[str, int]) -> tuple[str, bool]:
    """Where the weight lived ("stage1.0.weight" -> "stage1.0", "repfx_add_1_weight" -> "repfx_add_1"), and
    whether that is a bare holder of these tensors alone, to be replaced; else a free numbered name beside it."""
    owner, _, leaf = attributes[0].target.rpartition(".")
    base = owner if leaf == "weight" and owner else attributes[0].target.removesuffix("_weight") or "layer"
    if base == owner and _only_holds(gm, owner, attributes, uses):
        return owner, True
    name, index = base, 0
    while _taken(gm, name):
        index += 1
        name = f"{base}_{index}"
    return name, False


def _only_holds(gm: fx.GraphModule, path: str, attributes: list[fx.Node], uses: dict[str, int]) -> bool:
    """Is ``path`` a bare ``nn.Module`` holding exactly these tensors, each read by this one call only?"""
    try:
        holder = gm.get_submodule(path)
    except AttributeError:
        return False
    own = {f"{path}.{name}" for name, _ in [*holder.named_parameters(recurse=False),
                                               *holder.named_buffers(recurse=False)]}
    return (type(holder) is nn.Module and not list(holder.children())
            and own == {attribute.target for attribute in attributes}
            and all(uses.get(attribute.target) == 1 and len(attribute.users) == 1 for attribute in attributes))


def _taken(gm: fx.GraphModule, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    try:
        holder = gm.get_submodule(owner) if owner else gm
    except AttributeError:
        return False
    return hasattr(holder, leaf)


def _forget(gm: fx.GraphModule, target: str, uses: dict[str, int]) -> None:
    """Drop an attribute nothing reads any more (its tensor now lives in the new module)."""
    uses[target] -= 1
    if uses[target] > 0:
        return
    owner, _, leaf = target.rpartition(".")
    holder = gm.get_submodule(owner) if owner else gm
    if hasattr(holder, leaf):
        delattr(holder, leaf)
