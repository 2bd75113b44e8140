"""``torch.compile(model, backend="repfx")``: re-parameterize the captured graph, then inductor.

Dynamo hands a backend a torch-level graph whose parameters and buffers are
graph *inputs* (``inline_inbuilt_nn_modules``), so nothing in it looks constant.
The backend binds those inputs to the tensors they hold at compile time (what
inductor's ``freezing`` does for inference), folds the graph, and compiles the
plain graph with inductor. That makes it an inference backend: weights changed
after compilation are not seen, and no gradient flows to them. A graph that
cannot be re-parameterized (training-mode BatchNorm, untraceable ops) is
compiled by inductor unchanged, with a warning that says why.
"""

from __future__ import annotations

import importlib.metadata
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx

BACKEND_NAME = "repfx"


def repfx_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], **inductor_options: Any) -> Callable:
    """The dynamo backend: fold ``gm``'s linear regions, then compile the plain graph with inductor."""
    from torch._inductor.compile_fx import compile_fx

    folded = plain_graph(gm, example_inputs)
    if folded is None:
        return compile_fx(gm, list(example_inputs), **inductor_options)
    plain, runtime_positions = folded
    compiled = compile_fx(plain, [example_inputs[i] for i in runtime_positions], **inductor_options)

    def run(*args: Any) -> Any:
        return compiled(*[args[i] for i in runtime_positions])

    return run


def plain_graph(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> tuple[fx.GraphModule, list[int]] | None:
    """(re-parameterized graph taking only the runtime inputs, their positions), or None to compile ``gm`` as is."""
    from .api import reparameterize
    from .errors import CaptureError, VerificationError

    state_positions = _module_state_positions(gm)
    if not state_positions:
        return None  # no module state: nothing constant to fold
    runtime_positions = [i for i in range(len(example_inputs)) if i not in state_positions]
    bound = _bind_module_state(gm, {i: example_inputs[i] for i in state_positions})
    try:
        plain = reparameterize(bound, tuple(example_inputs[i] for i in runtime_positions))
    except (CaptureError, VerificationError) as error:
        warnings.warn(f"repfx backend: graph compiled without re-parameterization: {error}", stacklevel=3)
        return None
    _drop_export_guards(plain)
    return plain, runtime_positions


def _drop_export_guards(gm: fx.GraphModule) -> None:
    """Remove the input-shape guard module ``torch.export`` puts in unlifted graphs.

    Dynamo already guards the inputs of the graph it compiled, and the guard module
    holds unpicklable closures that make inductor's cache skip the graph.
    """
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            gm.graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
        gm.recompile()


def _module_state_positions(gm: fx.GraphModule) -> set[int]:
    """Placeholders that dynamo lifted from module parameters / buffers (by their source)."""
    from torch._dynamo.source import is_from_unspecialized_param_buffer_source

    positions = set()
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    for index, node in enumerate(placeholders):
        grapharg = node.meta.get("grapharg")
        if grapharg is not None and is_from_unspecialized_param_buffer_source(grapharg.source):
            positions.add(index)
    return positions


def _bind_module_state(gm: fx.GraphModule, state: dict[int, torch.Tensor]) -> fx.GraphModule:
    """A copy of ``gm`` whose state placeholders read buffers holding the compile-time tensors."""
    graph = fx.Graph()
    holder = torch.nn.Module()
    env: dict[fx.Node, fx.Node] = {}
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    for index, node in enumerate(placeholders):
        if index in state:
            name = f"frozen_{index}"
            holder.register_buffer(name, state[index].detach())
            env[node] = graph.get_attr(name)
        else:
            env[node] = graph.placeholder(node.name)
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            env[node] = graph.node_copy(node, lambda n: env[n])
    for name, module in gm.named_children():
        holder.add_module(name, module)
    for name, buffer in gm.named_buffers(recurse=False):
        holder.register_buffer(name, buffer)
    for name, parameter in gm.named_parameters(recurse=False):
        holder.register_parameter(name, parameter)
    return fx.GraphModule(holder, graph).eval()


def register() -> None:
    """Make ``backend="repfx"`` resolvable after ``import repfx``.

    An installed repfx declares the backend as a ``torch_dynamo_backends`` entry
    point, which torch loads on lookup; registering it again would make torch's
    registry assert on a duplicate name, so this only registers when that entry
    point is absent (a checkout on ``sys.path``).
    """
    if importlib.metadata.entry_points(group="torch_dynamo_backends", name=BACKEND_NAME):
        return
    from torch._dynamo.backends.registry import register_backend

    try:
        register_backend(repfx_backend, name=BACKEND_NAME)
    except AssertionError:  # already registered in this process
        pass
