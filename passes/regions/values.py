"""Reading op arguments for the rules: int-or-list sizes, per-channel constants, branch shapes.

Pure helpers with no state: the analyzer re-exports them (``as_ints``, ``per_channel``), so
rules keep importing from one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, fx

from repfx.passes.algebra.forms import NotExact


def as_ints(value: Any, rank: int) -> tuple[int, ...]:
    """An int-or-list op argument (stride, padding...) as one int per spatial dim."""
    if isinstance(value, int):
        return (value,) * rank
    values = tuple(int(v) for v in value)
    return values * rank if len(values) == 1 else values


def per_channel(value: Any, shape: tuple[int, ...], rank: int | None = None) -> Tensor | None:
    """``value`` as a [C] vector if it broadcasts per channel over [N, *shape], else None.

    ``rank``: the rank of the tensor ``value`` applies to, when known: a constant of more
    dims would broadcast that tensor up to a larger one, which no per-channel op does.
    """
    if rank is not None and isinstance(value, torch.Tensor) and value.dim() > rank:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.full((shape[0],), float(value), dtype=torch.float64)
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return None
    extra = value.dim() - len(shape) - 1  # a channel-last read of [N, H, W, C] sees shape (C,)
    if extra > 0:
        if any(size != 1 for size in value.shape[:extra]):
            return None  # varies along the dims a channel-last read takes as batch
        value = value.reshape(value.shape[extra:])
    full = value.reshape((1,) * (len(shape) + 1 - value.dim()) + tuple(value.shape))
    if any(size != 1 for dim, size in enumerate(full.shape) if dim != 1) or full.shape[1] not in (1, shape[0]):
        return None
    return full.reshape(-1).to(torch.float64).expand(shape[0]).clone()


def same_shapes(node: fx.Node, operands: Sequence[fx.Node]) -> None:
    """Branches of a sum must have the sum's shape: a broadcast is no sum of convolutions."""
    for operand in operands:
        if _symbolic_shape(operand) != _symbolic_shape(node):
            raise NotExact("broadcast", f"add broadcasts {_symbolic_shape(operand)} to {_symbolic_shape(node)}; "
                           "branches must have equal shapes")


def _symbolic_shape(node: fx.Node) -> str:
    return str(tuple(node.meta["val"].shape[1:]))
