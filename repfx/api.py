"""Public entry points: ``reparameterize`` and ``explain`` (and ``reparameterize_whole`` for deploy code that needs
one graph)."""

from __future__ import annotations

import copy
import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from repfx.passes import run_pipeline
from repfx.passes.cost import CostRule

from repfx.capture.export import SupportedModel, capture
from repfx.capture.inputs import as_input_tuple  # also imported from here by repfx.deploy
from repfx.capture.partial import (can_fold_in_parts, fold_in_parts, report_of, warn_folded_in_parts,
                                   whole_model_message)
from repfx.errors import CaptureError
from repfx.targets import Target, cost_rule
from repfx.verify.local import LocalProver
from repfx.verify.mismatch import judge
from repfx.verify.opcount import count_ops, summarize
from repfx.report import Refusal, Report, Rewrite
from repfx.verify.numeric import check_tolerances, copy_inputs, input_sets
from repfx.verify.numeric import verify as verify_outputs

PLANNING = ("cost", "target", "batch", "precision", "backend")  # what ``repfx.targets.cost_rule`` takes
LOCAL_PROOF_TRIALS = 1  # seeded input sets besides the example inputs for the per-region proofs


def reparameterize(
    model: SupportedModel,
    example_inputs: Sequence[Any],
    *,
    verify: bool = True,
    rtol: float | None = None,
    atol: float | None = None,
    dynamic_batch: bool = False,
    cost: Literal["latency", "measure", "macs", "always"] | CostRule = "latency",
    target: Target = None,
    batch: int | None = None,
    strict: bool = False,
    partial: bool = True,
    progress: Callable[[str], None] | None = None,
) -> fx.GraphModule | nn.Module:
    """Training-form ``model`` -> plain GraphModule with eval semantics; ``gm.meta["repfx"]`` is the Report.

    Every linear region (convs, eval BN, identities, scales, avg-pools, zero pads,
    concats, linears with no nonlinearity inside) is folded into as few convolutions
    as compute it exactly, unless that would make the model slower on the device it
    will run on. ``cost="latency"`` (the default) models each form's time op by op
    (a roofline: arithmetic, memory traffic, launch overhead) on ``target``: the
    example inputs' device unless named (``"cpu"``, ``"cuda"``, or a GPU this
    machine lacks, ``"cuda:h200"``), at ``batch`` samples (default: the example
    inputs' batch). ``cost="measure"`` times the contested forms on the device
    instead; ``cost="macs"`` counts multiply-accumulates; ``cost="always"`` merges
    everything exact. The report lists each contested decision (a merge that adds
    MACs) with both forms' costs. ``model`` is never modified.

    With ``verify``, each rewrite is first proven locally: the region and its
    replacement are evaluated in float64 on the activations that reach it (example
    and seeded inputs), and a rewrite that fails is undone and reported. Then the
    whole result is compared with the captured original in the model's dtype. A
    difference there, with every region proven, comes from fp32 rounding through
    discontinuous ops (top-k, argmax...) or an ill-conditioned model: it is accepted
    with a warning and a report note naming those ops, or refused with
    ``VerificationError`` when ``strict``. ``progress`` is called with each phase's
    name ("capture", "rewrite", "verify") as it starts.

    An ``nn.Module`` that torch.export cannot capture whole (NMS, top-k, loops over
    data) is folded in parts (``repfx.capture.partial``), with a ``UserWarning`` naming
    the line that blocked the whole: the result is then a copy of the model whose
    capturable submodules are replaced by their plain graphs, checked end to end
    against the model, and its Report is ``result.repfx_report``. ``partial=False``
    raises the ``CaptureError`` instead.
    """
    result, _ = _reparameterize(model, example_inputs, partial=partial, verify=verify, rtol=rtol, atol=atol,
                                dynamic_batch=dynamic_batch, cost=cost, target=target, batch=batch, strict=strict,
                                progress=progress)
    return result


def explain(model: SupportedModel, example_inputs: Sequence[Any], *,
            cost: Literal["latency", "measure", "macs", "always"] | CostRule = "latency", target: Target = None,
            batch: int | None = None, partial: bool = True) -> Report:
    """What ``reparameterize`` would merge and refuse (and op counts, and each contested decision with its
    costs), without verification; for a model folded in parts, part by part (``report.parts``,
    ``report.kept_parts``)."""
    _, report = _reparameterize(model, example_inputs, partial=partial, verify=False, rtol=None, atol=None,
                                dynamic_batch=False, cost=cost, target=target, batch=batch)
    return report


def reparameterize_whole(model: SupportedModel, example_inputs: Sequence[Any], **options: Any) -> fx.GraphModule:
    """``reparameterize`` for callers that need the model as one graph (a .pt2, ONNX, TensorRT).

    A model torch.export cannot capture whole raises ``CaptureError`` whose first line
    names the line that blocks it and the largest part that folds, to export instead
    (found by folding in parts without verification).
    """
    try:
        return reparameterize(model, example_inputs, partial=False, **options)
    except CaptureError as error:
        planning = {key: options[key] for key in PLANNING if key in options}
        message = _whole_model_message(model, as_input_tuple(example_inputs), error, planning)
        if message is None:
            raise
        raise CaptureError(message) from error


def _whole_model_message(model, example_inputs: tuple, error: CaptureError, planning: dict) -> str | None:
    """What blocks capturing ``model`` whole and the part to export instead; None where it cannot be folded in parts."""
    if not can_fold_in_parts(model):
        return None
    try:
        folded = _in_parts(model, example_inputs, error, verify=False, rtol=None, atol=None, dynamic_batch=False,
                           cost=_planned_rule(planning, example_inputs))
    except CaptureError:
        return None
    return whole_model_message(report_of(folded))


def _reparameterize(model, example_inputs, *, partial: bool, **options: Any) -> tuple[nn.Module, Report]:
    """``_run``; for an ``nn.Module`` torch.export cannot capture whole (and ``partial``), ``fold_in_parts``."""
    planning = {key: options.pop(key) for key in PLANNING if key in options}
    options["cost"] = _planned_rule(planning, as_input_tuple(example_inputs))
    start = time.perf_counter()
    try:
        return _run(model, example_inputs, **options)
    except CaptureError as error:
        if not partial or not can_fold_in_parts(model):
            raise
        failed_capture = time.perf_counter() - start
        folded = _in_parts(model, as_input_tuple(example_inputs), error, **options)
    report = report_of(folded)
    report.seconds = {"whole-model capture": failed_capture} | report.seconds
    warn_folded_in_parts(report, stacklevel=3)
    return folded, report


def _planned_rule(planning: dict, example_inputs: tuple) -> CostRule:
    """The cost rule, resolved once from the whole model's inputs (parts folded alone see only their own)."""
    planning = dict(planning)
    return cost_rule(planning.pop("cost", "latency"), example_inputs=example_inputs, **planning)


def _in_parts(model, example_inputs: tuple, blocker: CaptureError, *, verify, rtol, atol, dynamic_batch, cost,
              strict=False, progress=None) -> nn.Module:
    """``fold_in_parts`` with this module's pipeline (``_run``, with local proofs) folding each part."""
    fold = functools.partial(_run, verify=verify, rtol=rtol, atol=atol, dynamic_batch=False, cost=cost, strict=strict)
    return fold_in_parts(model, example_inputs, blocker, fold, verify=verify, rtol=rtol, atol=atol, strict=strict,
                         dynamic_batch=dynamic_batch, progress=progress or (lambda phase: None))


def _run(model, example_inputs, *, verify, rtol, atol, dynamic_batch, cost: CostRule, strict=False,
         progress=None) -> tuple[fx.GraphModule, Report]:
    rule = dataclasses.replace(cost, decisions={})  # this graph's decisions only (parts share the settings)
    check_tolerances(rtol, atol)
    progress = progress or (lambda phase: None)
    progress("capture")
    example_inputs = as_input_tuple(example_inputs)
    report = Report(model=_model_name(model))
    clock = time.perf_counter()
    captured = capture(model, example_inputs, dynamic_batch=dynamic_batch)
    gm = captured.graph
    report.mode_changes = [str(change) for change in captured.mode_changes]
    report.buffers_written = list(captured.buffers_written)
    report.notes += _non_finite_input_notes(example_inputs)
    reference = copy.deepcopy(gm)
    clock = _lap(report, "capture", clock)
    progress("rewrite")

    prover = LocalProver(input_sets(example_inputs, LOCAL_PROOF_TRIALS)) if verify else None
    results = run_pipeline(gm, rule, prover=prover, eager_runtime=True)  # before verification, so the check covers it
    report.iterations = len(results)
    for step in results:
        report.rewrites += [Rewrite(r.kind, r.replaced_ops, r.kernel_shapes, r.ops_before, r.ops_after)
                            for r in step.rewrites]
    # The first round sees the graph as captured (the user's node names) and is complete:
    # later rounds only confirm the fixed point and would repeat its refusals.
    # Failed local proofs of later rounds are new; a region that failed stays as written and
    # fails again in each round, so each (node, reason) is reported once.
    refusals = list(results[0].refusals) + [refusal for step in results[1:] for refusal in step.refusals
                                            if refusal.code == "local-proof"]
    report.refusals = [Refusal(refusal.node, refusal.reason) for refusal in dict.fromkeys(refusals)]
    report.cost_rule = rule.describe()
    report.decisions = [decision.to_dict() for decision in results[0].decisions]  # first round, as refusals
    clock = _lap(report, "rewrite", clock)

    # Running a graph that writes its buffers advances them: every check runs on copies,
    # so the returned graph starts from the model's own state.
    on_copy = copy.deepcopy if captured.buffers_written else (lambda graph: graph)
    progress("verify" if verify else "count")
    if verify:
        report.local_proofs = prover.summary
        stats = verify_outputs(on_copy(reference), on_copy(gm), example_inputs, rtol=rtol, atol=atol,
                               extra_batch=3 if dynamic_batch else None, raise_on_mismatch=False)
        report.max_abs_error, report.max_rel_error, report.tolerance = (
            stats.max_abs_error, stats.max_rel_error, stats.tolerance)
        if stats.mismatches:
            report.verification_note = judge(stats, reference, gm, example_inputs, prover.summary,
                                             rtol=rtol, atol=atol, extra_batch=3 if dynamic_batch else None,
                                             strict=strict)
        ops_before, ops_after = stats.reference_ops, stats.candidate_ops  # counted while verifying
        _lap(report, "verify", clock)
    else:
        ops_before = count_ops(on_copy(reference), copy_inputs(example_inputs))
        ops_after = count_ops(on_copy(gm), copy_inputs(example_inputs))
        _lap(report, "count", clock)
    report.ops_before, report.ops_after = summarize(ops_before), summarize(ops_after)
    report.parameters_before = _parameter_count(reference)
    report.parameters_after = _parameter_count(gm)
    gm.meta["repfx"] = report
    return gm, report


def _non_finite_input_notes(example_inputs: tuple) -> list[str]:
    """Example inputs with NaN/inf still work (equal non-finite outputs agree), but prove less: say so."""
    notes = []
    for index, leaf in enumerate(pytree.tree_leaves(example_inputs)):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and not bool(torch.isfinite(leaf).all()):
            notes.append(f"example input {index} holds NaN or inf values; the proofs at those positions rest "
                         "on the seeded random inputs")
    return notes


def _lap(report: Report, phase: str, start: float) -> float:
    now = time.perf_counter()
    report.seconds[phase] = now - start
    return now


def _parameter_count(gm: fx.GraphModule) -> int:
    """Elements of every tensor the graph reads (folded BN statistics vanish, so they count too)."""
    used = {node.target for node in gm.graph.nodes if node.op == "get_attr"}
    tensors = dict(gm.named_parameters()) | dict(gm.named_buffers())
    return sum(t.numel() for name, t in tensors.items() if name in used and t.is_floating_point())


def _model_name(model: Any) -> str:
    return type(model).__name__
