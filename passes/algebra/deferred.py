"""Kernels computed when first read: a combination the cost rule refuses costs no arithmetic.

The analysis combines forms for every region it considers, and the cost rule then
refuses many of them: a depthwise 7x7 composed with the 1x1 expansion after it is a
dense 7x7 with 49x the parameters, built twice per round (once merging everything,
once op by op) only to be priced and dropped. So the kernel of a combination is a
``Deferred``: its shape, known at once, is all a price needs; its values are computed
the first time they are read (emission, or a further combination that needs them),
by the same arithmetic in the same order as if they had been computed at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


class Deferred:
    """A kernel of known shape whose values ``compute`` returns when first needed.

    ``compute`` must return a new tensor that nothing else holds: ``fresh`` hands it
    to a caller that accumulates into it (a sum of branches), saving a copy.
    """

    __slots__ = ("_compute", "_value", "shape")

    def __init__(self, shape: Sequence[int], compute: Callable[[], Tensor]) -> None:
        self.shape = torch.Size(shape)
        self._compute = compute
        self._value: Tensor | None = None

    def value(self) -> Tensor:
        """The kernel, computed once and kept."""
        if self._value is None:
            self._value = self._computed()
        return self._value

    def fresh(self) -> Tensor:
        """The kernel as a tensor the caller may write into: computed for it when not kept yet
        (the usual case: a combination is read once, by the next one), else a copy."""
        if self._value is not None:
            return self._value.clone(memory_format=torch.contiguous_format)
        return self._computed()

    def _computed(self) -> Tensor:
        value = self._compute()
        if value.shape != self.shape:  # a wrong shape would have priced the wrong op
            raise RuntimeError(f"a deferred kernel announced as {tuple(self.shape)} "
                               f"was computed as {tuple(value.shape)}")
        return value
