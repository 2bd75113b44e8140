"""Sizes of traced tensors as plain ints: a symbolic size is read at its hint.

A dynamic dimension (a batch made symbolic, spatial sizes from a TorchScript
conversion) is a ``SymInt`` whose hint is the example value it was traced with.
Exactness never depends on those sizes, but costs and synthesized inputs need a
number; both layers (passes and capture) read it here.
"""

from __future__ import annotations

from typing import Any


def size_hint(size: Any) -> int | None:
    """``size`` as an int: a symbolic size at its hint (the example value it was traced with); None without one."""
    if isinstance(size, int):
        return size
    hint = getattr(getattr(size, "node", None), "hint", None)
    return int(hint) if hint is not None else None
