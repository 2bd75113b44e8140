"""Numerical proof that a rewritten graph computes what the original computes.

Both graphs run on the example inputs and on seeded random inputs of the same
shapes; the largest absolute difference over all float outputs must stay within
``atol + rtol * max(1, max|y|)``, a tolerance relative to the output magnitude.
When that fails, both graphs are re-run in float64 to tell an inexact rewrite
(an error) from an ill-conditioned model whose own fp32 rounding exceeds the bound.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
import copy
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch.utils import _pytree as pytree

from .batching import example_batch_size, is_batched, with_batch
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
    note: str = ""  # set when an fp32 mismatch was shown to be rounding noise in float64
    reference_ops: Counter[str] = field(default_factory=Counter)  # executed on the example inputs
    candidate_ops: Counter[str] = field(default_factory=Counter)


def random_like(example_inputs: Sequence[Any], seed: int, batch: int | None = None) -> tuple:
    """Seeded inputs with the examples' shapes and dtypes; with ``batch``, batched inputs get that batch.

    Integer and bool inputs (ids, masks) keep their values: random ones could be out of
    range. Resized, they repeat their own rows.
    """
    generator = torch.Generator().manual_seed(seed)
    size = example_batch_size(example_inputs)

    def draw(leaf: Any) -> Any:
        if not isinstance(leaf, torch.Tensor):
            return leaf
        resize = batch is not None and is_batched(leaf, size)
        if not leaf.is_floating_point():
            return with_batch(leaf, batch) if resize else leaf
        shape = (batch, *leaf.shape[1:]) if resize else leaf.shape
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
        # Each run gets its own copy: a forward may write into its inputs (x.div_(255)),
        # and the caller's tensors must come back untouched.
        reference_inputs, candidate_inputs = copy_inputs(inputs), copy_inputs(inputs)
        with torch.no_grad(), (reference_counter if set_index == 0 else nullcontext()):
            expected = pytree.tree_leaves(reference(*reference_inputs))
        with torch.no_grad(), (candidate_counter if set_index == 0 else nullcontext()):
            actual = pytree.tree_leaves(candidate(*candidate_inputs))
        if len(expected) != len(actual):
            raise VerificationError(f"rewritten graph returns {len(actual)} outputs, original {len(expected)}")
        for index, (want, got) in enumerate(zip(expected, actual)):
            _check_same_kind(index, want, got)
            if not isinstance(want, torch.Tensor) or not want.is_floating_point() or not want.numel():
                continue
            tolerance = (atol or 0.0) + (DEFAULT_RTOL.get(want.dtype, 1e-4) if rtol is None else rtol) * _magnitude(want)
            error = (want.double() - got.double()).abs().max().item()
            if not error <= tolerance:  # also catches NaN
                note = _float64_second_opinion(reference, candidate, inputs, index, want, got, error, tolerance,
                                               set_index)
                worst = replace(worst, note=note)
            if error / _magnitude(want) >= worst.max_rel_error:
                worst = replace(worst, max_rel_error=error / _magnitude(want), tolerance=tolerance)
            worst = replace(worst, max_abs_error=max(error, worst.max_abs_error))
    return replace(worst, reference_ops=reference_counter.counts, candidate_ops=candidate_counter.counts)


def copy_inputs(inputs: tuple) -> tuple:
    return pytree.tree_map(lambda leaf: leaf.clone() if isinstance(leaf, torch.Tensor) else leaf, inputs)


def _magnitude(tensor: torch.Tensor) -> float:
    return max(1.0, tensor.double().abs().max().item())


def _check_same_kind(index: int, want: Any, got: Any) -> None:
    if not isinstance(want, torch.Tensor):
        if want != got:
            raise VerificationError(f"output {index}: {got!r} != {want!r}")
        return
    if not isinstance(got, torch.Tensor) or got.shape != want.shape or got.dtype != want.dtype:
        raise VerificationError(f"output {index}: got {_describe(got)}, expected {_describe(want)}")
    if not want.is_floating_point() and not torch.equal(want, got):
        raise VerificationError(f"output {index}: integer/bool values differ")


def _float64_second_opinion(reference: Callable, candidate: Callable, inputs: tuple, index: int,
                            want: torch.Tensor, got: torch.Tensor, error: float, tolerance: float,
                            set_index: int) -> str:
    """Tell a wrong graph from rounding noise when the fp32 check fails.

    Deep nets with many cancelling branches can be ill-conditioned: the original
    fp32 model is itself far from its exact (float64) value. Both graphs are then
    evaluated in float64: the rewrite is accepted only if it is exact there and its
    fp32 result is no farther from the exact value than twice the original's own
    rounding error. Otherwise ``VerificationError`` carries all the numbers.
    """
    message = (f"output {index} differs on input set {set_index} (0 = the example inputs): max |difference| = "
               f"{error:.3e} > tolerance {tolerance:.3e} (atol + rtol * max(1, max|y|={_magnitude(want):.3g})). "
               "The rewritten graph was not returned.")
    try:
        as64 = lambda leaf: leaf.double() if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() else leaf
        with torch.no_grad():
            inputs64 = pytree.tree_map(as64, inputs)
            exact = pytree.tree_leaves(copy.deepcopy(reference).double()(*copy_inputs(inputs64)))[index]
            rewritten = pytree.tree_leaves(copy.deepcopy(candidate).double()(*copy_inputs(inputs64)))[index]
    except Exception as failure:
        raise VerificationError(f"{message} (a float64 re-check was not possible: {failure})") from None
    magnitude = _magnitude(exact)
    rewrite_error = (rewritten - exact).abs().max().item()
    original_noise = (want.double() - exact).abs().max().item()
    candidate_noise = (got.double() - exact).abs().max().item()
    numbers = (f"in float64 the rewritten graph is {rewrite_error:.1e} from the original; in {want.dtype} the "
               f"original is {original_noise:.1e} from its float64 value and the rewritten graph {candidate_noise:.1e}")
    if rewrite_error <= DEFAULT_RTOL[torch.float64] * magnitude and candidate_noise <= 2 * original_noise:
        return f"output {index}: fp32 difference {error:.1e} is rounding noise ({numbers})"
    raise VerificationError(f"{message} {numbers.capitalize()}. If the rewrite is exact in float64 and the model "
                            "is ill-conditioned, pass a larger rtol=.")


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor {tuple(value.shape)} {value.dtype}"
    return type(value).__name__
