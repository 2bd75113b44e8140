"""Example inputs against what the model takes, said in one line that names the expected shape.

torch reports an input that does not fit in its own terms: an INTERNAL ASSERT for a
TorchScript model given fewer inputs than its forward takes, "Invalid channel
dimensions", a matmul's reduction sizes, or a weight's shape with symbolic sizes
(``expected input[s48, 5, 32, 32]``). What a person needs is what the model takes:

* how many inputs, by name (forward's signature: TorchScript's schema or Python's),
  checked before capture (``check_input_count``);
* when capture has failed, the rank and channels (features) the model's first
  convolution or linear layer reads, if the input reaches it unchanged and does not fit
  (``input_mismatch``). "First" is the layer the input reaches first: the first in
  the TorchScript graph, or the first whose forward is entered when a copy of a Python
  module is run on the inputs (stopped there).
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from repfx.errors import InputMismatch

_SPATIAL = {1: ["L"], 2: ["H", "W"], 3: ["D", "H", "W"]}  # named sizes of a convolution's input, after N and C
_TS_CONVOLUTIONS = {"aten::_convolution": 8, "aten::conv1d": 6, "aten::conv2d": 6, "aten::conv3d": 6}  # -> groups


@dataclass(frozen=True)
class Layer:
    """The first convolution or linear layer an input reaches: what it reads along which dimension."""

    name: str  # module path, e.g. stem.conv
    kind: str  # "convolution" or "linear"
    weight: tuple[int, ...]
    features: int  # input channels (convolution) or in_features (linear)

    def expected(self) -> str:
        """``Nx3xHxW`` / ``...x48``: the input shape the layer reads, sizes it leaves free as letters."""
        if self.kind == "linear":
            return f"...x{self.features}"
        return "x".join(["N", str(self.features), *_SPATIAL.get(len(self.weight) - 2, ["..."])])

    def reads(self) -> str:
        """``3 channels (Nx3xHxW)``: what the layer reads, in words and as a shape."""
        return f"{self.features} {'features' if self.kind == 'linear' else 'channels'} ({self.expected()})"

    def fits(self, shape: Sequence[int]) -> bool:
        if self.kind == "linear":
            return len(shape) >= 1 and shape[-1] == self.features
        return len(shape) == len(self.weight) and shape[1] == self.features

    def suggested(self, shape: Sequence[int]) -> tuple[int, ...] | None:
        """``shape`` made to fit (the feature size set; an unbatched input given batch 1), or None if its rank
        is too far off to guess the rest."""
        if self.kind == "linear":
            return (*shape[:-1], self.features) if shape else None
        rank = len(self.weight)
        if len(shape) == rank - 1:  # no batch dimension
            shape = (1, *shape)
        return (shape[0], self.features, *shape[2:]) if len(shape) == rank else None


def check_input_count(model: Any, inputs: tuple) -> None:
    """Refuse example inputs fewer or more than forward's arguments, naming them (TorchScript asserts otherwise)."""
    names = forward_parameters(model)
    if names is None:
        return
    required, accepted = names
    if len(required) <= len(inputs) <= len(accepted):
        return
    wanted = len(required) if len(inputs) < len(required) else len(accepted)
    shown = required if len(inputs) < len(required) else accepted
    raise InputMismatch(f"{_model_name(model)} takes {wanted} input{'s' * (wanted != 1)} "
                        f"({', '.join(shown)}), got {len(inputs)}", names=list(shown))


def forward_parameters(model: Any) -> tuple[list[str], list[str]] | None:
    """(required, accepted) positional argument names of ``model``'s forward; None when it takes any number."""
    if isinstance(model, torch.jit.ScriptModule):
        arguments = model.forward.schema.arguments[1:]  # self left out
        return [a.name for a in arguments if not a.has_default_value()], [a.name for a in arguments]
    if not isinstance(model, nn.Module) or isinstance(model, torch.fx.GraphModule):
        return None
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_POSITIONAL for p in parameters):
        return None
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return [p.name for p in positional if p.default is p.empty], [p.name for p in positional]


def input_mismatch(model: Any, inputs: tuple) -> InputMismatch | None:
    """Why capture failed, if an input does not fit the first layer it reaches unchanged; else None."""
    found = _first_layer(model, inputs)
    if found is None:
        return None
    layer, index = found
    shape = tuple(inputs[index].shape)
    if layer.fits(shape):
        return None  # the input fits where it enters: the failure is elsewhere
    suggestion = layer.suggested(shape)
    names = (forward_parameters(model) or ([], []))[1]
    label = f"input {index}" + (f" ({names[index]})" if index < len(names) else "")
    problem = (f"{label} has shape {_shape(shape)}, but the model's first {layer.kind} `{layer.name}` "
               f"(weight {_shape(layer.weight)}) reads {layer.reads()}")
    fitting = _shape(suggestion) if suggestion is not None else layer.expected()  # a rank too far off: the pattern
    shapes = [fitting if i == index else _shape(t.shape) for i, t in enumerate(inputs)]
    return InputMismatch(problem, shapes=shapes, names=names or None)


def _first_layer(model: Any, inputs: tuple) -> tuple[Layer, int] | None:
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        return None
    if isinstance(model, torch.jit.ScriptModule):
        return _first_scripted_layer(model)
    if isinstance(model, nn.Module) and not isinstance(model, torch.fx.GraphModule):
        return _first_entered_layer(model, inputs)
    return None


class _Entered(Exception):
    """Raised by the hook of the first layer entered, to stop the run there."""

    def __init__(self, module: nn.Module, argument: Any) -> None:
        super().__init__()
        self.module, self.argument = module, argument


def _first_entered_layer(model: nn.Module, inputs: tuple) -> tuple[Layer, int] | None:
    """Run a copy of ``model`` on ``inputs`` until the first convolution or linear layer is entered."""
    try:
        clone = copy.deepcopy(model).eval()
    except Exception:
        return None
    names = {module: name for name, module in clone.named_modules() if isinstance(module, _LAYER_TYPES)}

    def stop(module: nn.Module, args: tuple) -> None:
        raise _Entered(module, args[0] if args else None)

    for module in names:
        module.register_forward_pre_hook(stop)
    try:
        with torch.no_grad():
            clone(*inputs)
    except _Entered as entered:
        index = next((i for i, t in enumerate(inputs) if t is entered.argument), None)
        return (_module_layer(names[entered.module], entered.module), index) if index is not None else None
    except Exception:
        return None
    return None


_LAYER_TYPES = (nn.modules.conv._ConvNd, nn.Linear)


def _module_layer(name: str, module: nn.Module) -> Layer:
    weight = tuple(module.weight.shape)
    if isinstance(module, nn.Linear):
        return Layer(name, "linear", weight, module.in_features)
    return Layer(name, "convolution", weight, module.in_channels)


def _first_scripted_layer(model: torch.jit.ScriptModule) -> tuple[Layer, int] | None:
    """The first convolution or linear call of the inlined TorchScript graph, if it reads an input directly."""
    graph = model.inlined_graph
    arguments = [value.unique() for value in list(graph.inputs())[1:]]  # self left out
    for node in graph.nodes():
        kind = node.kind()
        if kind not in _TS_CONVOLUTIONS and kind != "aten::linear":
            continue
        source = node.inputsAt(0).unique()
        path = _attribute_path(node.inputsAt(1))
        if source not in arguments or path is None:
            return None
        weight = tuple(functools.reduce(getattr, path, model).shape)
        if kind == "aten::linear":
            return Layer(".".join(path[:-1]), "linear", weight, weight[1]), arguments.index(source)
        groups = node.inputsAt(_TS_CONVOLUTIONS[kind]).toIValue()
        transposed = kind == "aten::_convolution" and node.inputsAt(6).toIValue()
        if not isinstance(groups, int) or transposed:
            return None
        return Layer(".".join(path[:-1]), "convolution", weight, weight[1] * groups), arguments.index(source)
    return None


def _attribute_path(value: Any) -> list[str] | None:
    """``["stem", "conv", "weight"]`` for a value read as ``self.stem.conv.weight``; None for anything else."""
    path = []
    node = value.node()
    while node.kind() == "prim::GetAttr":
        path.append(node.s("name"))
        node = node.input().node()
    return path[::-1] if path and node.kind() == "prim::Param" else None


def _model_name(model: Any) -> str:
    """The model's own class name (a TorchScript module's is ``RecursiveScriptModule``)."""
    return getattr(model, "original_name", None) or type(model).__name__


def _shape(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape)) if len(shape) else "a scalar"

