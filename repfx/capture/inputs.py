"""Which inputs carry the batch dimension when ``dynamic_batch=True``.

The rule: a tensor input is batched when its dim 0 equals dim 0 of the first tensor
input. A side input such as a ``[1, C, 1, 1]`` gain that broadcasts over the batch
then stays static (as long as the example batch is not 1 itself: with a batch-1
example every leading 1 looks like a batch, so pass a batch of 2+ to tell them apart).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree


def example_batch_size(inputs: Any) -> int | None:
    first = next((leaf for leaf in pytree.tree_leaves(inputs) if isinstance(leaf, torch.Tensor) and leaf.dim()), None)
    return None if first is None else int(first.shape[0])


def is_batched(leaf: Any, batch_size: int | None) -> bool:
    return isinstance(leaf, torch.Tensor) and leaf.dim() > 0 and batch_size is not None and leaf.shape[0] == batch_size


def with_batch(leaf: torch.Tensor, batch: int) -> torch.Tensor:
    """``leaf`` with ``batch`` rows, repeating its own rows (so integer ids stay valid ids)."""
    rows = torch.arange(batch, device=leaf.device) % leaf.shape[0]
    return leaf[rows].clone()
