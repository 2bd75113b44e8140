"""TorchScript -> the ExportedProgram torch.export gives for the same model, so both fold alike.

torch's ``TS2EPConverter`` replays the TorchScript graph as aten calls in an fx graph,
then re-traces that graph with ``torch.export``. What comes out differs from
``torch.export`` of the model the TorchScript came from in four ways, each undone here:

* The re-trace marks every dimension ``Dim.AUTO``, so spatial sizes stay symbolic and
  shape reads (``x.view(x.shape)``) stay ``sym_size`` nodes. The model was traced (or is
  exported here) at one shape; repfx re-traces the converted graph static, or with its own
  dynamic batch, like any ``nn.Module``.
* ``torch.jit.trace`` records a Python number as a 0-dim tensor constant, so MobileOne's
  ``scale_out + 0`` and ``y * 0.5`` read a lifted tensor where torch.export writes the
  number. A tensor operand is a second input to the add: branches then "read different
  tensors" and the fold refuses (mobileone_s1 kept 17 BatchNorms and 47 adds).
* ``torch.jit.trace`` records ``out[:, :c, :, :]`` as four ``aten.slice``, full ranges
  included, where torch.export writes the slices that cut something (or one ``alias``
  when none does): the same values, but 3-4 ops more per slicing in executed-op counts.
* Inputs are named by TorchScript's debug names (``x.1`` -> ``x_1``), which become the
  ONNX input names and break the feed dicts of deploy scripts; the forward's own
  argument names are kept.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true, sym_eq

from repfx.capture.failure import loggers_at, quiet_torch_logs, torch_reason
from repfx.errors import CaptureError

aten = torch.ops.aten
# The ops jit.trace records with a number operand as a tensor (``x + 0``, ``y * 0.5``); torch.export writes the number.
_NUMBER_OPERAND = (aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor)

DynamicShapes = Callable[[fx.GraphModule, tuple], Any]  # (converted graph, inputs) -> torch.export's dynamic_shapes


def convert_torchscript(module: torch.jit.ScriptModule, inputs: tuple,
                        dynamic_shapes: DynamicShapes | None = None) -> torch.export.ExportedProgram:
    """``module`` as an ExportedProgram re-traced static (or with ``dynamic_shapes``), its inputs named as in forward."""
    if module.training:
        raise CaptureError("the TorchScript module is in training mode; call .eval() before torch.jit.save "
                           "(repfx cannot switch a scripted module without modifying it)")
    try:
        from torch._export.converter import TS2EPConverter  # here: importing it doubles `import repfx`

        # The converter warns about every BatchNorm's num_batches_tracked and logs each
        # specialized dim; none of it is actionable for the user.
        # A failed replay logs the meta kernel's traceback (torch._subclasses.fake_tensor): held back too.
        with warnings.catch_warnings(), loggers_at(logging.ERROR, ["torch._export.non_strict_utils"]), \
                quiet_torch_logs():
            warnings.simplefilter("ignore", UserWarning)
            converter = TS2EPConverter(module, inputs)
            converter.retrace_as_exported_program = lambda gm, _: _retrace(gm, module, inputs, dynamic_shapes)
            return converter.convert()
    except Exception as error:
        raise CaptureError(f"converting the TorchScript module to an ExportedProgram failed: {torch_reason(error)}\n"
                           "Fix: export the original nn.Module with torch.export instead.") from error


def _retrace(gm: fx.GraphModule, module: torch.jit.ScriptModule, inputs: tuple,
             dynamic_shapes: DynamicShapes | None) -> torch.export.ExportedProgram:
    """The converter's last step, done as torch.export does it for a module: its shapes, the forward's names.

    (torch's version also files the lifted constants as constants rather than buffers:
    the unlifted graph repfx folds reads both as ``get_attr``, so that is left out.)
    """
    _name_inputs(gm, forward_argument_names(module))
    shapes = dynamic_shapes(gm, inputs) if dynamic_shapes else None
    return torch.export.export(gm, inputs, dynamic_shapes=shapes, strict=False)


def forward_argument_names(module: torch.jit.ScriptModule) -> list[str]:
    """The names forward was written with (``x``), from its TorchScript schema; ``self`` left out."""
    return [argument.name for argument in module.forward.schema.arguments[1:]]


def _name_inputs(gm: fx.GraphModule, names: list[str]) -> None:
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    if len(placeholders) != len(names):
        return  # not one placeholder per argument (a packed argument): torch's names stay
    for node, name in zip(placeholders, names):
        clash = next((other for other in gm.graph.nodes if other.name == name and other is not node), None)
        if clash is not None:
            clash._rename(f"{name}_value")  # an inner value took the name; the input has the better claim
        node._rename(name)
        node.target = node.name
    gm.recompile()


def numbers_as_scalars(gm: fx.GraphModule, own_state: set[str]) -> bool:
    """Write each number jit.trace recorded as a 0-dim tensor operand as the number, like torch.export.

    Only constants the trace made (not the module's own parameters and buffers, which
    torch.export keeps as tensors too), and only where the result dtype stays the same
    (a float64 0-dim tensor promotes an integer tensor to float64; the number would not).
    Returns whether anything changed.
    """
    modified = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _NUMBER_OPERAND or len(node.args) < 2:
            continue
        tensor, constant = node.args[:2]
        number = _traced_number(gm, constant, own_state)
        value, result = getattr(tensor, "meta", {}).get("val"), node.meta.get("val")
        if number is None or not isinstance(value, torch.Tensor) or not isinstance(result, torch.Tensor):
            continue
        if torch.result_type(value, number) != result.dtype:
            continue  # the tensor's dtype took part in the promotion: it stays a tensor
        node.args = (tensor, number, *node.args[2:])
        modified = True
        if not constant.users:
            gm.graph.erase_node(constant)
            if not any(other.op == "get_attr" and other.target == constant.target for other in gm.graph.nodes):
                delattr(gm, constant.target)
    if modified:
        gm.recompile()
    return modified


def _traced_number(gm: fx.GraphModule, node: Any, own_state: set[str]) -> int | float | bool | None:
    if not isinstance(node, fx.Node) or node.op != "get_attr" or node.target in own_state:
        return None  # a value, or the module's own tensor
    constant = getattr(gm, node.target, None)
    if not isinstance(constant, torch.Tensor) or constant.dim() != 0 or constant.is_complex():
        return None
    return constant.item()


def full_slices_dropped(gm: fx.GraphModule) -> bool:
    """Write each chain of ``aten.slice`` as torch.export does: the slices that cut something, or one ``alias``.

    A slice of step 1 whose output has its input's shape takes every element: it is
    its input. Returns whether anything changed.
    """
    erased: set[fx.Node] = set()
    for node in list(gm.graph.nodes):
        if node in erased or not _is_slice(node) or _is_slice(node.args[0]) and len(node.args[0].users) == 1:
            continue  # gone, or not the first slice of a chain
        chain = [node]
        while len(chain[-1].users) == 1 and _is_slice(next(iter(chain[-1].users))):
            chain.append(next(iter(chain[-1].users)))
        cuts = [link for link in chain if not _takes_everything(link)]
        if len(cuts) == len(chain):
            continue
        value = chain[0].args[0]
        for link in cuts:
            link.replace_input_with(link.args[0], value)
            value = link
        if not cuts:  # torch's indexing returns a view even when it cuts nothing
            with gm.graph.inserting_after(chain[-1]):
                value = gm.graph.call_function(aten.alias.default, (value,))
            value.meta.update(chain[-1].meta)
        if value is not chain[-1]:
            chain[-1].replace_all_uses_with(value)
        for link in reversed(chain):
            if link not in cuts:
                gm.graph.erase_node(link)
                erased.add(link)
    if erased:
        gm.recompile()
    return bool(erased)


def _is_slice(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target == aten.slice.Tensor


def _takes_everything(node: fx.Node) -> bool:
    step = node.args[4] if len(node.args) > 4 else node.kwargs.get("step", 1)
    source, result = node.args[0].meta.get("val"), node.meta.get("val")
    if step != 1 or not isinstance(source, torch.Tensor) or not isinstance(result, torch.Tensor):
        return False
    return source.dim() == result.dim() and all(
        statically_known_true(sym_eq(a, b)) for a, b in zip(source.shape, result.shape))
