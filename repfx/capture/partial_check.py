"""The end-to-end check of a model folded in parts, what a difference there means, and its report.

Each part was proven as a whole graph is: every rewritten region in float64 on the
activations that reach it, then the part against its captured original. The folded
model is then compared with the eval copy of the model as given by
``repfx.verify.numeric.verify`` (the same input sets and tolerance rule). A difference
follows the policy of ``repfx.verify.mismatch.judge``: with every rewritten region
proven and fp32 rounding explaining it, it is accepted with a warning and a note
(``strict=True`` refuses it); anything else is an error. One thing differs: the code
between the parts is the model's own Python, not a graph, so the discontinuous ops that
turn rounding into different selections are those its forward executed (counted while
verifying: top-k, sort, nonzero, comparisons, torchvision's nms, ...), not those found
downstream in a graph.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from torch import nn

from repfx.capture.calls import describe
from repfx.errors import VerificationError
from repfx.passes.constants import float64_values
from repfx.report import KeptPart, Part, Refusal, Report
from repfx.verify.local import ProofSummary
from repfx.verify.mismatch import DISCONTINUOUS, accept_or_refuse, agreement_in_float64
from repfx.verify.numeric import ErrorStats, copy_inputs, verify as verify_outputs
from repfx.verify.opcount import count_ops, summarize

if TYPE_CHECKING:
    from repfx.capture.partial import FoldedSubmodule

# Executed op names that select (their count loses the overload, so max/min, continuous unless .dim, are left out).
SELECTING = (frozenset(DISCONTINUOUS) - {"max", "min"}) | {"nms", "batched_nms"}
NOT_RETURNED = "The model folded in parts was not returned."


def check_whole(report: Report, given: nn.Module, folded: nn.Module, example_inputs: tuple, *, verify: bool,
                rtol: float | None, atol: float | None, strict: bool) -> None:
    """Compare ``folded`` with ``given`` (copies of both run: a forward may write state) and count executed ops."""
    if not verify:
        report.ops_before = summarize(count_ops(copy.deepcopy(given), copy_inputs(example_inputs)))
        report.ops_after = summarize(count_ops(copy.deepcopy(folded), copy_inputs(example_inputs)))
        return
    stats = verify_outputs(copy.deepcopy(given), copy.deepcopy(folded), example_inputs, rtol=rtol, atol=atol,
                           raise_on_mismatch=False)
    report.max_abs_error, report.max_rel_error, report.tolerance = (
        stats.max_abs_error, stats.max_rel_error, stats.tolerance)
    report.ops_before, report.ops_after = summarize(stats.reference_ops), summarize(stats.candidate_ops)
    if stats.mismatches:
        report.verification_note = _accepted(stats, given, folded, example_inputs, report.local_proofs,
                                             rtol=rtol, atol=atol, strict=strict)


def _accepted(stats: ErrorStats, given: nn.Module, folded: nn.Module, example_inputs: tuple,
              proofs: ProofSummary | None, *, rtol: float | None, atol: float | None, strict: bool) -> str:
    """The note for an accepted difference; ``VerificationError`` when it cannot be accepted."""
    more = len(stats.mismatches) - 1
    mismatch = stats.mismatches[0] + (f" ({more} more mismatch(es))" if more else "")
    if proofs is None or not proofs.regions_proven:
        raise VerificationError(f"{mismatch}. {NOT_RETURNED}")
    selecting = sorted(name for name in stats.candidate_ops if name in SELECTING)
    cause = (f"the model's forward runs discontinuous ops ({', '.join(selecting[:8])}) on what the parts compute, "
             "which turn fp32 rounding into different selections" if selecting
             else _amplified_rounding(given, folded, example_inputs, rtol, atol, mismatch))
    note = (f"end-to-end check: {mismatch}, while each of the {proofs.regions_proven} rewritten region(s) in the "
            f"folded parts matched the original in float64 (worst {proofs.worst_relative_error:.1e} relative); "
            f"{cause}")
    return accept_or_refuse(note, "the model folded in parts differs", strict=strict, stacklevel=7)


def _amplified_rounding(given: nn.Module, folded: nn.Module, example_inputs: tuple, rtol: float | None,
                        atol: float | None, mismatch: str) -> str:
    """Why a difference with no discontinuous op is rounding (both models agree in float64), or the error."""
    stats = agreement_in_float64(
        lambda tolerance: verify_outputs(copy.deepcopy(given).double(), copy.deepcopy(folded).double(),
                                         float64_values(example_inputs), rtol=tolerance, atol=atol,
                                         raise_on_mismatch=False),
        example_inputs, rtol, mismatch, NOT_RETURNED)
    return (f"no discontinuous op runs, and in float64 the folded model is within tolerance of the original "
            f"(max |difference| {stats.max_abs_error:.1e}): the model amplifies fp32 rounding")


# --- the report ---------------------------------------------------------------------------------------------------

def add_parts(report: Report, given: nn.Module, folded: list[FoldedSubmodule], kept: list[KeptPart]) -> None:
    """The parts' rewrites, refusals, proofs and op counts, in the whole model's report (node names get the
    part's name: ``backbone/convolution_3``)."""
    for part in sorted(folded, key=lambda part: -_elements(part.module)):
        before, after = Counter(), Counter()
        for key, part_report in part.reports.items():
            calls = part.calls.counts[key]
            before.update({name: count * calls for name, count in part_report.ops_before.items()})
            after.update({name: count * calls for name, count in part_report.ops_after.items()})
            _merge(report, part.name, part_report)
        report.parts.append(Part(part.name, type(part.module).__name__, sum(part.calls.counts.values()),
                                 len(part.reports), tuple(describe(key) for key in part.reports), dict(before),
                                 dict(after), sum(len(r.rewrites) for r in part.reports.values())))
    report.kept_parts = list(kept)
    proofs = [r.local_proofs for part in folded for r in part.reports.values() if r.local_proofs is not None]
    if proofs:
        report.local_proofs = ProofSummary(sum(p.regions_proven for p in proofs), sum(p.regions_failed for p in proofs),
                                           max(p.input_sets for p in proofs),
                                           max(p.worst_relative_error for p in proofs))
    report.parameters_before = _elements(given)
    report.parameters_after = report.parameters_before + sum(
        sum(r.parameters_after for r in part.reports.values()) - next(iter(part.reports.values())).parameters_before
        for part in folded)


def _merge(report: Report, name: str, part_report: Report) -> None:
    report.rewrites += [replace(rewrite, nodes=tuple(f"{name}/{node}" for node in rewrite.nodes))
                        for rewrite in part_report.rewrites]
    report.refusals += [Refusal(f"{name}/{refusal.node}", refusal.reason) for refusal in part_report.refusals]
    report.buffers_written += [f"{name}.{buffer}" for buffer in part_report.buffers_written]
    report.notes += [f"{name}: {note}" for note in part_report.notes]
    if part_report.verification_note:
        report.notes.append(f"{name}: {part_report.verification_note}")
    report.iterations = max(report.iterations, part_report.iterations)


def _elements(module: Any) -> int:
    """Floating elements of a module's parameters and buffers (BN statistics count: folding removes them)."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() for t in tensors if t.is_floating_point())
