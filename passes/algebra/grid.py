"""The common tap grid of parallel forms: where each branch's kernel lands in their merged kernel.

Branches of one input that produce the same output grid (equal stride and alignment)
add, or stack, once their kernels are written on one grid of taps; ``forms`` does the
arithmetic (``kernels.add_placed``), this module only the geometry.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import reduce
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # forms imports this module
    from repfx.passes.algebra.forms import ConvForm


def common_grid(forms: Sequence[ConvForm]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], list[tuple]]:
    """One tap grid for every form's kernel: (size, padding, dilation, per form (offsets, steps)).

    The grid spans offsets ``[-P, P - alignment]`` around each output's anchor, where
    P is the largest padding; its step (the merged dilation) is the largest that
    still hits every tap of every form, so a dilated kernel stays dilated.
    """
    padding, dilation, size = [], [], []
    placements: list[list[tuple[int, int]]] = [[] for _ in forms]
    for dim in range(forms[0].rank):
        pad = max(form.padding[dim] for form in forms)
        extent = 2 * pad - forms[0].alignment[dim]
        spacings = [extent] + [pad - form.padding[dim] for form in forms]
        spacings += [form.dilation[dim] for form in forms if form.kernel_size[dim] > 1]
        step = reduce(math.gcd, spacings) or 1
        padding.append(pad)
        dilation.append(step)
        size.append(extent // step + 1)
        for placement, form in zip(placements, forms):
            tap_step = form.dilation[dim] // step if form.kernel_size[dim] > 1 else 1
            placement.append(((pad - form.padding[dim]) // step, tap_step))
    return tuple(size), tuple(padding), tuple(dilation), [tuple(zip(*p)) or ((), ()) for p in placements]


def fills_grid(form: ConvForm, groups: int, size: tuple[int, ...], placement: tuple) -> bool:
    """Whether ``form``'s kernel is already the whole grid (same groups, every tap in place)."""
    offsets, steps = placement
    return (form.groups == groups and form.kernel_size == size
            and not any(offsets) and all(step == 1 for step in steps))
