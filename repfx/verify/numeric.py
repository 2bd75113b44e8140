"""End-to-end numerical check that a rewritten graph computes what the original computes.

Both graphs run on the example inputs and on seeded random inputs of the same
shapes; the largest absolute difference over all float outputs must stay within
``atol + rtol * max(1, max|y|)``, a tolerance relative to the output magnitude.
Where both outputs hold the same non-finite value (a ``-inf`` mask, a NaN the model
itself produces) they agree. Integer and bool outputs must be equal.

This module only measures. What a mismatch means is decided by the caller: a
backend that disagrees with the plain graph is an error, while a rewrite whose
every region was proven exact in float64 (``repfx.verify.local``) can differ end
to end only by fp32 rounding, which a model may amplify (``repfx.verify.mismatch``).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch.utils import _pytree as pytree

from repfx.capture.inputs import random_like
from repfx.errors import VerificationError
from repfx.verify.opcount import OpCounter

# Default rtol per dtype: fp32 folding reorders sums (~1e-6 relative); fp16/bf16 weights
# are rounded once after folding in fp64.
DEFAULT_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


@dataclass(frozen=True)
class ErrorStats:
    max_abs_error: float
    max_rel_error: float  # max|d| / max(1, max|y|)
    tolerance: float  # the bound max|d| was checked against (for the worst case)
    inputs_checked: int
    mismatches: tuple[str, ...] = ()  # one line per output and input set beyond tolerance
    reference_ops: Counter[str] = field(default_factory=Counter)  # executed on the example inputs
    candidate_ops: Counter[str] = field(default_factory=Counter)


def check_tolerances(rtol: Any, atol: Any) -> None:
    """``rtol``/``atol`` are None or finite numbers >= 0 (a NaN bound would accept everything)."""
    for name, value in (("rtol", rtol), ("atol", atol)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0 (or None for the default), got {value!r}")


def input_sets(example_inputs: Sequence[Any], random_trials: int = 2, extra_batch: int | None = None,
               more: Sequence[tuple] = ()) -> list[tuple]:
    """The example inputs and ``more`` example sets, then ``random_trials`` seeded draws like the first (and one at
    ``extra_batch``)."""
    sets = [tuple(example_inputs), *more] + [random_like(example_inputs, seed) for seed in range(random_trials)]
    if extra_batch is not None:
        sets.append(random_like(example_inputs, random_trials, batch=extra_batch))
    return sets


def verify(
    reference: Callable,
    candidate: Callable,
    example_inputs: Sequence[Any],
    *,
    rtol: float | None = None,
    atol: float | None = None,
    random_trials: int = 2,
    extra_batch: int | None = None,
    raise_on_mismatch: bool = True,
    more: Sequence[tuple] = (),
) -> ErrorStats:
    """Compare ``candidate`` with ``reference`` on every input set (``more``: further example sets).

    Raises ``VerificationError`` when outputs differ in number, shape or dtype, and
    (unless ``raise_on_mismatch=False``) when values differ beyond tolerance; otherwise
    the mismatches are returned in ``ErrorStats.mismatches`` for the caller to judge.
    """
    check_tolerances(rtol, atol)
    sets = input_sets(example_inputs, random_trials, extra_batch, more)
    given = 1 + len(more)
    worst = ErrorStats(0.0, 0.0, 0.0, len(sets))
    mismatches: list[str] = []
    reference_counter, candidate_counter = OpCounter(), OpCounter()
    for set_index, inputs in enumerate(sets):
        # The example run doubles as the op count, saving two forward passes.
        # Each run gets its own copy: a forward may write into its inputs (x.div_(255)),
        # and the caller's tensors must come back untouched.
        reference_inputs, candidate_inputs = copy_inputs(inputs), copy_inputs(inputs)  # not counted as ops
        with torch.no_grad(), (reference_counter if set_index == 0 else nullcontext()):
            expected = pytree.tree_leaves(reference(*reference_inputs))
        with torch.no_grad(), (candidate_counter if set_index == 0 else nullcontext()):
            actual = pytree.tree_leaves(candidate(*candidate_inputs))
        if len(expected) != len(actual):
            raise VerificationError(f"rewritten graph returns {len(actual)} outputs, original {len(expected)}")
        for index, (want, got) in enumerate(zip(expected, actual)):
            _check_same_kind(index, want, got)
            where = (f"output {index} on input set {set_index} (0 = the example inputs)" if given == 1 else
                     f"output {index} on input set {set_index} (0-{given - 1} = the example input sets)")
            if not isinstance(want, torch.Tensor) or not want.numel():
                continue
            if not want.is_floating_point():
                if not torch.equal(want, got):
                    changed = int((want != got).sum())
                    mismatches.append(f"{where}: {changed} of {want.numel()} integer/bool values differ")
                continue
            scale = magnitude(want)
            tolerance = (atol or 0.0) + (DEFAULT_RTOL.get(want.dtype, 1e-4) if rtol is None else rtol) * scale
            error = difference(want, got)
            if not error <= tolerance:  # also catches NaN
                mismatches.append(f"{where}: max |difference| = {error:.3e} > tolerance {tolerance:.3e} "
                                  f"(atol + rtol * max(1, max|y|={scale:.3g}))")
            if error / scale >= worst.max_rel_error:
                worst = replace(worst, max_rel_error=error / scale, tolerance=tolerance)
            worst = replace(worst, max_abs_error=max(error, worst.max_abs_error))
    if mismatches and raise_on_mismatch:
        raise VerificationError(f"{mismatches[0]}. The rewritten graph was not returned."
                                + (f" ({len(mismatches) - 1} more mismatch(es))" if len(mismatches) > 1 else ""))
    return replace(worst, mismatches=tuple(mismatches), reference_ops=reference_counter.counts,
                   candidate_ops=candidate_counter.counts)


def copy_inputs(inputs: tuple) -> tuple:
    return pytree.tree_map(lambda leaf: leaf.clone() if isinstance(leaf, torch.Tensor) else leaf, inputs)


def magnitude(tensor: torch.Tensor) -> float:
    """``max(1, max|y|)`` over the finite values: the scale a tolerance is relative to."""
    if not tensor.numel():
        return 1.0
    peak = _peak(tensor)
    if math.isfinite(peak):  # every value is finite (a NaN or inf would make the peak one): no mask needed
        return max(1.0, peak)
    finite = tensor[torch.isfinite(tensor)]
    return max(1.0, finite.double().abs().max().item()) if finite.numel() else 1.0


def difference(want: torch.Tensor, got: torch.Tensor) -> float:
    """max |want - got|, where equal non-finite values (inf and inf, NaN and NaN) count as equal.

    A position finite on one side and not on the other, or holding different
    non-finite values, is an infinite difference. When every difference is finite,
    so is every value, and their largest is the answer without building the masks.
    """
    want, got = want.double(), got.double()
    delta = want - got
    if delta.numel():
        peak = _peak(delta)
        if math.isfinite(peak):
            return peak
    finite = torch.isfinite(want) & torch.isfinite(got)
    same_special = ~finite & ((want == got) | (torch.isnan(want) & torch.isnan(got)))
    if not bool((finite | same_special).all()):
        return math.inf
    if not bool(finite.any()):
        return 0.0
    return (want[finite] - got[finite]).abs().max().item()


def _peak(tensor: torch.Tensor) -> float:
    """max |tensor| (NaN when it holds one), without an ``abs`` copy of it; 0.0, never -0.0, for zeros."""
    low, high = torch.aminmax(tensor)
    return max(abs(low.item()), abs(high.item())) if not (low.isnan() or high.isnan()) else math.nan


def _check_same_kind(index: int, want: Any, got: Any) -> None:
    if not isinstance(want, torch.Tensor):
        if want != got:
            raise VerificationError(f"output {index}: {got!r} != {want!r}")
        return
    if not isinstance(got, torch.Tensor) or got.shape != want.shape or got.dtype != want.dtype:
        raise VerificationError(f"output {index}: got {_describe(got)}, expected {_describe(want)}")


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor {tuple(value.shape)} {value.dtype}"
    return type(value).__name__
