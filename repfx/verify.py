"""Numerical proof that a rewritten graph computes what the original computes.

Both graphs run on the example inputs and on seeded random inputs of the same
shapes; the largest absolute difference over all float outputs must stay within
``atol + rtol * max(1, max|y|)``, a tolerance relative to the output magnitude.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch.utils import _pytree as pytree

from .errors import VerificationError
from .opcount import OpCounter

# Default rtol per dtype: fp32 folding reorders sums (~1e-6 relative); fp16/bf16 weights
# are rounded once after folding in fp64.
DEFAULT_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


@dataclass(frozen=True)
class ErrorStats:
    max_abs_error: float
    max_rel_error: float  # max|d| / max(1, max|y|)
    tolerance: float  # the bound max|d| was checked against (for the worst case)
    inputs_checked: int
    reference_ops: Counter[str] = field(default_factory=Counter)  # executed on the example inputs
    candidate_ops: Counter[str] = field(default_factory=Counter)


def random_like(example_inputs: Sequence[Any], seed: int, batch: int | None = None) -> tuple:
    """Seeded inputs with the examples' shapes and dtypes (batch overridden when given)."""
    generator = torch.Generator().manual_seed(seed)

    def draw(leaf: Any) -> Any:
        if not isinstance(leaf, torch.Tensor) or not leaf.is_floating_point():
            return leaf
        shape = (batch, *leaf.shape[1:]) if batch is not None and leaf.dim() else leaf.shape
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(leaf.dtype)

    return tuple(pytree.tree_map(draw, list(example_inputs)))


def verify(
    reference: Callable,
    candidate: Callable,
    example_inputs: Sequence[Any],
    *,
    rtol: float | None = None,
    atol: float | None = None,
    random_trials: int = 2,
    extra_batch: int | None = None,
) -> ErrorStats:
    """Raise ``VerificationError`` unless ``candidate`` matches ``reference`` on every input set."""
    input_sets = [tuple(example_inputs)] + [random_like(example_inputs, seed) for seed in range(random_trials)]
    if extra_batch is not None:
        input_sets.append(random_like(example_inputs, random_trials, batch=extra_batch))
    worst = ErrorStats(0.0, 0.0, 0.0, len(input_sets))
    reference_counter, candidate_counter = OpCounter(), OpCounter()
    for set_index, inputs in enumerate(input_sets):
        # The example run doubles as the op count, saving two forward passes.
        with torch.no_grad(), (reference_counter if set_index == 0 else nullcontext()):
            expected = pytree.tree_leaves(reference(*inputs))
        with torch.no_grad(), (candidate_counter if set_index == 0 else nullcontext()):
            actual = pytree.tree_leaves(candidate(*inputs))
        if len(expected) != len(actual):
            raise VerificationError(f"rewritten graph returns {len(actual)} outputs, original {len(expected)}")
        for index, (want, got) in enumerate(zip(expected, actual)):
            worst = _compare(index, set_index, want, got, rtol, atol, worst)
    return replace(worst, reference_ops=reference_counter.counts, candidate_ops=candidate_counter.counts)


def _compare(index: int, set_index: int, want: Any, got: Any, rtol: float | None, atol: float | None,
             worst: ErrorStats) -> ErrorStats:
    if not isinstance(want, torch.Tensor):
        if want != got:
            raise VerificationError(f"output {index}: {got!r} != {want!r}")
        return worst
    if not isinstance(got, torch.Tensor) or got.shape != want.shape or got.dtype != want.dtype:
        raise VerificationError(f"output {index}: got {_describe(got)}, expected {_describe(want)}")
    if not want.is_floating_point():
        if not torch.equal(want, got):
            raise VerificationError(f"output {index}: integer/bool values differ")
        return worst
    rtol = DEFAULT_RTOL.get(want.dtype, 1e-4) if rtol is None else rtol
    atol = 0.0 if atol is None else atol
    want64, got64 = want.double(), got.double()
    magnitude = max(1.0, want64.abs().max().item()) if want.numel() else 1.0
    error = (want64 - got64).abs().max().item() if want.numel() else 0.0
    tolerance = atol + rtol * magnitude
    if not error <= tolerance:  # also catches NaN
        raise VerificationError(
            f"output {index} differs on input set {set_index} (0 = the example inputs): max |difference| = "
            f"{error:.3e} > tolerance {tolerance:.3e} (atol={atol:g} + rtol={rtol:g} * max(1, max|y|={magnitude:.3g})). "
            "The rewritten graph was not returned.")
    if error / magnitude >= worst.max_rel_error:
        return ErrorStats(max(error, worst.max_abs_error), error / magnitude, tolerance, worst.inputs_checked)
    return ErrorStats(max(error, worst.max_abs_error), worst.max_rel_error, worst.tolerance, worst.inputs_checked)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor {tuple(value.shape)} {value.dtype}"
    return type(value).__name__
