"""What an end-to-end mismatch means once every rewritten region was proven exact, and what to do.

Each region was checked in float64 on the activations that reach it
(``repfx.verify.local``), so the rewritten graph computes the same function as the
original up to one rounding of the folded weights and a different order of fp32
sums. Two things turn that into a visible output difference, and neither is a wrong
rewrite: discontinuous ops after the regions (top-k, sort, argmax, comparisons,
nonzero, gathers at data-dependent indices: a near-tie flips on the last bit), and
models that amplify rounding (large cancelling branches; then the graphs agree in
float64, where the order of sums stops mattering). Such a result is accepted with a
note and a warning naming the cause; ``strict=True`` refuses it instead. A mismatch
with no proven region to stand on, or one float64 confirms, is an error.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

from repfx.passes.constants import float64_values
from repfx.passes.emit import REWRITE_META

from repfx.errors import VerificationError, first_line, warn_user
from repfx.verify.local import ProofSummary
from repfx.verify.numeric import DEFAULT_RTOL, ErrorStats, verify

# Op name -> argument positions through which the op is discontinuous (None: every tensor argument).
DISCONTINUOUS: dict[str, tuple[int, ...] | None] = {
    **{name: None for name in (
        "topk", "sort", "argsort", "argmax", "argmin", "kthvalue", "mode", "median", "nanmedian", "msort",
        "gt", "lt", "ge", "le", "eq", "ne", "greater", "less", "greater_equal", "less_equal", "equal",
        "isclose", "nonzero", "nonzero_static", "argwhere", "masked_select", "unique", "_unique2",
        "unique_consecutive", "unique_dim", "searchsorted", "bucketize", "round", "floor", "ceil", "trunc",
        "sign", "heaviside", "remainder", "fmod", "floor_divide", "histc", "bincount")},
    # Values pass through continuously; the index (or mask) argument selects.
    "max": None, "min": None,  # only the .dim overloads (values + indices) reach here, see _selects
    "index": (1,), "gather": (2,), "index_select": (2,), "take_along_dim": (1,), "take": (1,),
    "masked_fill": (1,), "where": (0,), "scatter": (2,), "scatter_add": (2,), "scatter_reduce": (2,),
    "index_put": (1,), "embedding": (1,),
}


def judge(stats: ErrorStats, reference: Callable, rewritten: Callable, example_inputs: tuple,
          proofs: ProofSummary | None, settings: Any, selection: str | None, *, extra_batch: int | None = None,
          in_parts: bool = False, more: Sequence[tuple] = ()) -> str:
    """The note for an accepted mismatch; raises ``VerificationError`` when it cannot be accepted.

    Accepted: every rewritten region was proven, and either discontinuous ops turn
    rounding into different selections (``selection`` says which, from the caller: those
    downstream of the rewrites in a graph, ``discontinuous_after_rewrites``, or those the
    forward of a model folded in parts executed), or in float64 (where
    the order of sums no longer matters) the rewritten model with its stored weights is
    within the same tolerance of the original, so the fp32 difference is rounding the
    model amplifies. ``settings`` (``repfx.settings.Settings``) gives tolerances and ``strict``.
    """
    result = "the model folded in parts" if in_parts else "the rewritten graph"
    not_returned = f"{result[0].upper()}{result[1:]} was not returned."
    mismatch = _first_mismatch(stats)
    if proofs is None or proofs.regions_proven == 0:
        raise VerificationError(f"{mismatch}. {not_returned}")
    if selection is not None:
        cause = selection
    else:
        float64 = _agreement_in_float64(reference, rewritten, example_inputs, settings, extra_batch, more,
                                        mismatch, not_returned)
        cause = (f"no discontinuous op follows them, and in float64 {result} is within tolerance of the "
                 f"original (max |difference| {float64.max_abs_error:.1e}), so the model amplifies fp32 rounding "
                 "(ill-conditioned)")
    note = (f"end-to-end check: {mismatch}, while each of the {proofs.regions_proven} rewritten "
            f"region(s) matched the original in float64 (worst {proofs.worst_relative_error:.1e} relative); "
            f"{cause}")
    subject = "the model folded in parts differs" if in_parts else "outputs differ"
    return _accept_or_refuse(note, f"repfx: {subject} from the original beyond tolerance although every rewrite is "
                                   "exact: ", strict=settings.strict)


def judge_backend(stats: ErrorStats, plain: fx.GraphModule, what: str, *, strict: bool) -> str:
    """The note for a backend's output that differs from the plain graph beyond tolerance; ``VerificationError``
    when it cannot be accepted.

    A backend recomputes every op in its own order and precision, so where the plain graph
    selects (top-k, sort, comparisons, NMS: RT-DETR's query selection over near-ties) a
    last-bit difference changes what is selected, exactly as between the rewritten graph
    and the original; that is accepted the same way, with a warning and a note
    (``strict`` refuses it). Without such an op the backend computes something else: an error.
    """
    mismatch = _first_mismatch(stats)
    selecting = _selecting_ops(plain, set(plain.graph.nodes))
    if not selecting:
        raise VerificationError(f"{what}: {mismatch}")
    note = (f"{what}: {mismatch}; the plain graph selects with discontinuous ops ({selecting}), where the "
            "backend's own fp32 rounding turns near-ties into different selections")
    return _accept_or_refuse(note, "repfx: ", strict=strict)


def _first_mismatch(stats: ErrorStats) -> str:
    others = f" ({len(stats.mismatches) - 1} more mismatch(es))" if len(stats.mismatches) > 1 else ""
    return stats.mismatches[0] + others


def _accept_or_refuse(note: str, warning: str, *, strict: bool) -> str:
    """The policy's last step for a difference rounding explains: refused under ``strict``, else said loudly
    (``warning`` opens the warning) and returned as the note."""
    if strict:
        raise VerificationError(f"{note}. Refused because strict=True.")
    warn_user(f"{warning}{note}. Accepted (strict=True refuses).")
    return f"{note}. Accepted (strict=True refuses)."


def _agreement_in_float64(reference: Callable, rewritten: Callable, example_inputs: tuple, settings: Any,
                          extra_batch: int | None, more: Sequence[tuple], mismatch: str, not_returned: str) -> ErrorStats:
    """Both sides re-run in float64 agree (their statistics), else ``VerificationError``.

    In float64 the order of sums no longer matters, so agreement there shows that an fp32
    difference is rounding the model amplifies; ``rtol`` defaults to the inputs' dtype's.
    """
    dtype = next((leaf.dtype for leaf in pytree.tree_leaves(example_inputs)
                  if isinstance(leaf, torch.Tensor) and leaf.is_floating_point()), torch.float32)
    rtol = DEFAULT_RTOL.get(dtype, 1e-4) if settings.rtol is None else settings.rtol
    try:
        stats = verify(_as_float64(reference), _as_float64(rewritten), _as_float64(example_inputs), rtol=rtol,
                       atol=settings.atol, extra_batch=extra_batch, raise_on_mismatch=False,
                       more=[_as_float64(inputs) for inputs in more])
    except Exception as error:
        raise VerificationError(f"{mismatch}, and the float64 re-check that could tell rounding from a wrong "
                                f"result failed ({first_line(error, 200)}). {not_returned}") from error
    if stats.mismatches:
        raise VerificationError(f"{mismatch}; in float64 too: {stats.mismatches[0]}, so this is not fp32 rounding. "
                                f"{not_returned}")
    return stats


def _as_float64(value: Any) -> Any:
    if isinstance(value, torch.nn.Module):
        return copy.deepcopy(value).double()
    return float64_values(value)


def discontinuous_after_rewrites(gm: fx.GraphModule) -> str | None:
    """Which discontinuous ops read, where they select, a value a rewrite computed (None: none do)."""
    downstream = _reachable(node for node in gm.graph.nodes if REWRITE_META in node.meta)
    found = _selecting_ops(gm, downstream)
    if not found:
        return None
    return f"discontinuous ops after the rewritten regions turn fp32 rounding into different selections: {found}"


def _selecting_ops(gm: fx.GraphModule, among: set[fx.Node]) -> str:
    """``"name (op), ..."`` (eight at most) for each op of ``among`` that selects, where it selects, by a value of
    ``among``; "" where none does."""
    found = [f"{node.name} ({_op_name(node)})" for node in gm.graph.nodes
             if node.op == "call_function" and node in among and _selects(node, among)]
    return f"{', '.join(found[:8])}{' ...' if len(found) > 8 else ''}"


def _reachable(starts: Iterable[fx.Node]) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = list(starts)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(node.users)
    return seen


def _selects(node: fx.Node, downstream: set[fx.Node]) -> bool:
    name = _op_name(node)
    if name not in DISCONTINUOUS:
        return False
    if name in ("max", "min") and getattr(node.target, "_overloadname", "") != "dim":
        return False  # a plain max/min is a continuous reduction
    positions = DISCONTINUOUS[name]
    args = list(node.args) if positions is None else [node.args[i] for i in positions if i < len(node.args)]
    return any(isinstance(arg, fx.Node) and arg in downstream
               for value in args for arg in pytree.tree_leaves(value))


def _op_name(node: fx.Node) -> str:
    packet = getattr(node.target, "overloadpacket", None)
    return packet.__name__ if packet is not None else getattr(node.target, "__name__", str(node.target))
