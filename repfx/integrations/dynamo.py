"""``torch.compile(model, backend="repfx")``: re-parameterize the captured graph, then inductor.

Dynamo hands a backend a torch-level graph whose parameters and buffers are
graph *inputs* (``inline_inbuilt_nn_modules``), so nothing in it looks constant.
The backend binds those inputs to the tensors they hold at compile time (what
inductor's ``freezing`` does for inference), folds the graph, and compiles the
plain graph with inductor. That makes it an inference backend: weights changed
after compilation are not seen. Wherever freezing would change what the graph
computes (state written in forward, training-mode BatchNorm or dropout,
gradients enabled for the parameters, dynamic sizes or varying Python scalars),
the graph is compiled by inductor unchanged, with a warning that says why.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx

from repfx.errors import first_line, warn_user


def repfx_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], *, mode: str | None = None,
                  options: dict[str, Any] | None = None) -> Callable:
    """The dynamo backend: fold ``gm``'s linear regions, then compile the plain graph with inductor.

    ``mode`` and ``options`` are ``torch.compile``'s, passed on to inductor as config patches.
    """
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    config_patches = {**(list_mode_options(mode) if mode else {}), **(options or {})}
    folded = plain_graph(gm, example_inputs)
    if folded is None:
        return compile_fx(gm, list(example_inputs), config_patches=config_patches)
    plain, runtime_positions = folded
    compiled = compile_fx(plain, [example_inputs[i] for i in runtime_positions], config_patches=config_patches)

    def run(*args: Any) -> Any:
        return compiled(*[args[i] for i in runtime_positions])

    return run


def plain_graph(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> tuple[fx.GraphModule, list[int]] | None:
    """(re-parameterized graph taking only the runtime inputs, their positions), or None to compile ``gm`` as is.

    None (with a warning saying why) whenever freezing the module state would change
    what the graph computes: state the graph writes (a call counter, running stats),
    gradients that would have to reach the parameters, or inputs that are not plain
    tensors (dynamic sizes, Python scalars that vary between calls).
    """
    from repfx.pipeline import run
    from repfx.settings import Settings

    state_positions = _module_state_positions(gm)
    if not state_positions:
        return None  # no module state: nothing constant to fold
    runtime_positions = [i for i in range(len(example_inputs)) if i not in state_positions]
    reason = _why_not_freezable(gm, example_inputs, state_positions, runtime_positions)
    if reason:
        _fallback_warning(reason)
        return None
    bound = _bind_module_state(gm, {i: example_inputs[i] for i in state_positions})
    try:
        plain = run(bound, tuple(example_inputs[i] for i in runtime_positions), Settings())
    except Exception as error:  # CaptureError, VerificationError, or torch failing on this graph
        _fallback_warning(first_line(error, limit=None))
        return None
    _drop_export_guards(plain)
    return plain, runtime_positions


def _why_not_freezable(gm: fx.GraphModule, example_inputs: Sequence[Any], state_positions: set[int],
                       runtime_positions: list[int]) -> str | None:
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    written = [placeholders[i].name for i in sorted(state_positions) if _is_written(placeholders[i])]
    if written:
        return f"forward writes module state ({', '.join(written)}), which freezing would turn into constants"
    random = [node.name for node in gm.graph.nodes if _is_training_dropout(node)]
    if random:
        return f"dropout in training mode ({', '.join(random[:3])}) is random; call model.eval() for inference"
    if torch.is_grad_enabled() and any(getattr(example_inputs[i], "requires_grad", False) for i in state_positions):
        return ("gradients are enabled and parameters require grad; repfx is an inference backend that freezes "
                "parameters (run under torch.inference_mode() or torch.no_grad() to re-parameterize)")
    for i in runtime_positions:
        value = example_inputs[i]
        if not isinstance(value, torch.Tensor) or any(not isinstance(size, int) for size in value.shape):
            return ("the graph has dynamic sizes or Python-scalar inputs, which the repfx backend does not "
                    "re-parameterize (compile with dynamic=False, or use repfx.compile(..., dynamic_batch=True))")
    return None


_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.setitem}


def _is_written(placeholder: fx.Node) -> bool:
    """Whether the graph writes into ``placeholder`` in place or hands it back (dynamo's mutation form)."""
    for user in placeholder.users:
        if user.op == "output":
            return True
        if not user.args or user.args[0] is not placeholder:
            continue
        if user.op == "call_function" and user.target in _INPLACE_OPERATORS:
            return True
        name = user.target if user.op == "call_method" else getattr(user.target, "__name__", "")
        if isinstance(name, str) and name.endswith("_") and not name.startswith("_"):
            return True
        schema = getattr(user.target, "_schema", None)
        if schema is not None and schema.is_mutable:
            return True
    return False


_DROPOUTS = {"dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout"}


def _is_training_dropout(node: fx.Node) -> bool:
    if node.op != "call_function" or getattr(node.target, "__name__", None) not in _DROPOUTS:
        return False
    training = node.args[2] if len(node.args) > 2 else node.kwargs.get("training", True)
    return bool(training)


def _fallback_warning(reason: str) -> None:
    warn_user(f"repfx backend: graph compiled by inductor without re-parameterization: {reason}")


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

    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    return {index for index, node in enumerate(placeholders) if node.meta.get("grapharg") is not None
            and is_from_unspecialized_param_buffer_source(node.meta["grapharg"].source)}


def _bind_module_state(gm: fx.GraphModule, state: dict[int, torch.Tensor]) -> fx.GraphModule:
    """A copy of ``gm`` whose state placeholders read buffers holding the compile-time tensors."""
    graph = fx.Graph()
    holder = torch.nn.Module()
    env: dict[fx.Node, fx.Node] = {}
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    for index, node in enumerate(placeholders):
        if index in state:
            name = f"frozen_{index}"
            # A copy: verification runs the graph, and must not touch the model's own tensors.
            holder.register_buffer(name, state[index].detach().clone())
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
