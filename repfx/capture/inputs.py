"""Example inputs: every rule about them, in one place.

* how they are given: ``as_input_tuple`` (a lone tensor or object is one argument);
* which placeholders of a program are the user's inputs, not its weights: ``user_input_nodes``;
* what a symbolic size stands for: ``size_hint`` (the example value export traced with);
* which inputs carry the batch: ``example_batch_size``, ``is_batched``, ``with_batch``;
* how inputs are synthesised: ``random_inputs`` from shapes and dtypes, ``random_like``
  from example inputs, ``recorded_inputs`` from what a saved program says about its inputs,
  ``drawer`` one tensor at a time.

The batch rule: a tensor input is batched when its dim 0 equals dim 0 of the first tensor
input. A side input such as a ``[1, C, 1, 1]`` gain that broadcasts over the batch then
stays static (as long as the example batch is not 1 itself: with a batch-1 example every
leading 1 looks like a batch, so pass a batch of 2+ to tell them apart).

The draw rule: one generator seeded once, consumed in input order; a floating input is a
float32 standard normal cast to its dtype and moved to its device; an integer or bool input
(ids, masks) is never drawn, since random values could be out of range: synthesised from a
shape it is zeros, derived from an example it keeps the example's values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import torch
from torch import fx
from torch.utils import _pytree as pytree

from repfx.passes.shapes import size_hint  # re-exported: the one reading of a symbolic size


class InputSpec(NamedTuple):
    """What it takes to synthesise one input tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    device: torch.device | str | None = None  # None: torch's default device


def as_input_sets(example_inputs: Any) -> list[tuple]:
    """One example input set, or several: a list whose every item is a tuple is several sets, each a tuple of
    positional arguments (``[(x_day,), (x_night,)]``); anything else is one set (``as_input_tuple``).

    Several sets reach code a single one does not (a forward that branches on the data):
    every set is recorded, proven and verified.
    """
    if isinstance(example_inputs, list) and example_inputs and all(isinstance(s, tuple) for s in example_inputs):
        return list(example_inputs)
    return [as_input_tuple(example_inputs)]


def as_input_tuple(example_inputs: Any) -> tuple:
    """Example inputs as a tuple of positional arguments (a lone tensor or object is one argument)."""
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


# --- placeholders and their sizes ----------------------------------------------------------------------------------

def user_input_nodes(program: torch.export.ExportedProgram) -> list[fx.Node]:
    """The placeholders that are the program's user inputs, in order (its parameters, buffers and constants are
    placeholders too)."""
    names = set(program.graph_signature.user_inputs)
    return [node for node in program.graph.nodes if node.op == "placeholder" and node.name in names]


def placeholder_specs(nodes: Iterable[fx.Node]) -> list[InputSpec] | None:
    """The spec of each placeholder's fake value (``meta["val"]``), symbolic sizes at their hints.

    None when a placeholder carries no tensor value or a size without a hint: then the
    graph does not say what its inputs look like, and nothing can be drawn for it.
    """
    specs = []
    for node in nodes:
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor):
            return None
        shape = tuple(size_hint(size) for size in value.shape)
        if None in shape:
            return None
        specs.append(InputSpec(shape, value.dtype, value.device))
    return specs


# --- the batch ------------------------------------------------------------------------------------------------------

def example_batch_size(inputs: Any) -> int | None:
    first = next((leaf for leaf in pytree.tree_leaves(inputs) if isinstance(leaf, torch.Tensor) and leaf.dim()), None)
    return None if first is None else int(first.shape[0])


def is_batched(leaf: Any, batch_size: int | None) -> bool:
    return isinstance(leaf, torch.Tensor) and leaf.dim() > 0 and batch_size is not None and leaf.shape[0] == batch_size


def with_batch(leaf: torch.Tensor, batch: int) -> torch.Tensor:
    """``leaf`` with ``batch`` rows, repeating its own rows (so integer ids stay valid ids)."""
    rows = torch.arange(batch, device=leaf.device) % leaf.shape[0]
    return leaf[rows].clone()


# --- synthesis ------------------------------------------------------------------------------------------------------

def random_inputs(specs: Iterable[InputSpec], seed: int) -> tuple:
    """One tensor per spec, by the draw rule (module docstring): the same seed gives the same tensors."""
    draw = drawer(seed)
    return tuple(draw(spec.shape, spec.dtype, spec.device) for spec in specs)


def random_like(example_inputs: Sequence[Any], seed: int, batch: int | None = None) -> tuple:
    """Seeded inputs with the examples' shapes, dtypes and devices; with ``batch``, batched inputs get that batch.

    Integer and bool inputs (ids, masks) keep their values: random ones could be out of
    range. Resized, they repeat their own rows. Leaves that are not tensors stay as they are.
    """
    draw = drawer(seed)
    size = example_batch_size(example_inputs)

    def like(leaf: Any) -> Any:
        if not isinstance(leaf, torch.Tensor):
            return leaf
        resize = batch is not None and is_batched(leaf, size)
        if not leaf.is_floating_point():
            return with_batch(leaf, batch) if resize else leaf
        return draw((batch, *leaf.shape[1:]) if resize else leaf.shape, leaf.dtype, leaf.device)

    return tuple(pytree.tree_map(like, list(example_inputs)))


def recorded_inputs(program: torch.export.ExportedProgram) -> tuple | None:
    """What a saved program says about its inputs: the example inputs saved with it (positional ones only),
    else zeros shaped like its user inputs; None when it says neither.

    Zeros, not draws: only their shapes and dtypes are meant to be read (the CLI draws its own
    inputs from them), and on the CPU whatever device the program was exported on.
    """
    stored = getattr(program, "example_inputs", None)
    if stored:
        args, kwargs = stored
        if not kwargs:
            return tuple(args)
    specs = placeholder_specs(user_input_nodes(program))
    if not specs:
        return None
    return tuple(torch.zeros(spec.shape, dtype=spec.dtype) for spec in specs)


def drawer(seed: int) -> Callable[..., torch.Tensor]:
    """``draw(shape, dtype, device)`` by the draw rule, every call consuming the one generator seeded here
    (also for a caller that draws tensor by tensor: weights too, as the forms ``cost="measure"`` times)."""
    generator = torch.Generator().manual_seed(seed)

    def draw(shape: Sequence[int], dtype: torch.dtype, device: torch.device | str | None) -> torch.Tensor:
        if not dtype.is_floating_point:
            return torch.zeros(shape, dtype=dtype, device=device)
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(dtype=dtype, device=device)

    return draw
