"""The calls a model makes to its submodules in one eager run: what partial capture captures each part with.

torch.export specializes a graph on its example inputs: their structure, shapes and
constant arguments. A submodule's plain graph is therefore valid only for calls of the
same *signature*: the pytree structure of ``(args, kwargs)``, the shape of each tensor
(and the dtype of integer/bool tensors, which index or mask), and the value of each
constant. Floating dtypes and devices are left out on purpose: a plain graph follows its
module's ``.to(dtype)`` / ``.to(device)`` like any GraphModule, and a folded model cast
for deployment (fp16) must keep running its folded parts.

Calls are recorded with forward pre-hooks (args and kwargs), once per signature (the
first call), with every call counted; tensors are cloned when the call happens, so a
caller that later writes into them in place does not change the record.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Hashable

import torch
from torch import nn
from torch.utils import _pytree as pytree

# Non-tensor leaves torch.export takes as constants (it specializes the graph on their values).
CONSTANTS = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.memory_format, torch.layout)

Signature = Hashable  # (TreeSpec, one key per leaf): see ``signature``


class Unsupported(Exception):
    """A call torch.export cannot take: an argument is neither a tensor, a constant nor a pytree container."""


def signature(args: tuple, kwargs: dict) -> Signature:
    """The key a plain graph is valid for; raises ``Unsupported`` naming the argument it cannot take."""
    leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
    return spec, tuple(_leaf_key(leaf) for leaf in leaves)


def _leaf_key(leaf: Any) -> Hashable:
    if isinstance(leaf, torch.Tensor):
        return ("tensor", tuple(leaf.shape), leaf.is_floating_point() or leaf.dtype)
    if isinstance(leaf, CONSTANTS):
        return (type(leaf), leaf)
    raise Unsupported(f"called with a {type(leaf).__name__} argument: torch.export takes tensors, numbers, strings "
                      "and containers of them (register the type as a pytree node to capture it)")


def describe(key: Signature) -> str:
    """A signature in a few words for messages: the tensor shapes, e.g. ``1x3x32x32, 1x8``."""
    _, leaves = key
    shapes = ["x".join(map(str, leaf[1])) or "scalar" for leaf in leaves if leaf[0] == "tensor"]
    return ", ".join(shapes) or "no tensors"


@dataclass
class Calls:
    """What one submodule was called with: an example ``(args, kwargs)`` per signature, and call counts."""

    examples: dict[Signature, tuple[tuple, dict]] = field(default_factory=dict)
    counts: Counter = field(default_factory=Counter)  # signature -> number of calls
    unsupported: str | None = None  # why some call cannot be captured (then none is)

    def add(self, args: tuple, kwargs: dict) -> None:
        if self.unsupported is not None:
            return
        try:
            key = signature(args, kwargs)
        except Unsupported as error:
            self.unsupported = str(error)
            return
        if key not in self.examples:
            self.examples[key] = _cloned((tuple(args), dict(kwargs)))
        self.counts[key] += 1


def record_calls(model: nn.Module, input_sets: list[tuple]) -> dict[str, Calls]:
    """Run ``model`` once per example input set (no grad) and return, by qualified name, what each submodule was
    called with over all of them.

    ``model`` should be a copy: its forward runs, and state it writes (counters, caches) advances.
    A shared submodule is recorded under its first name (``named_modules`` order).
    """
    recorded: dict[str, Calls] = {}
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue  # the model itself: its capture is what failed
        calls = recorded.setdefault(name, Calls())
        handles.append(module.register_forward_pre_hook(_recorder(calls), with_kwargs=True))
    try:
        with torch.no_grad():
            for inputs in input_sets:
                model(*_cloned(tuple(inputs)))
    finally:
        for handle in handles:
            handle.remove()
    return {name: calls for name, calls in recorded.items() if calls.counts or calls.unsupported}


def _recorder(calls: Calls):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        calls.add(args, kwargs)

    return hook


def _cloned(value: Any) -> Any:
    """Tensors cloned (detached), everything else as it is, inside any pytree container."""
    return pytree.tree_map(lambda leaf: leaf.detach().clone() if isinstance(leaf, torch.Tensor) else leaf, value)
