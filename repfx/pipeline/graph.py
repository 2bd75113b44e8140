"""One graph through the pipeline: capture -> passes (proving each rewrite) -> verify -> report.

Everything that folds a graph comes through ``fold_captured``: a whole model
(``fold_graph``), each part of a model folded in parts (``repfx.pipeline.parts``) and
the graph torch-tensorrt hands its lowering passes (``repfx.integrations.torch_tensorrt``),
so the report of each is built the same way, field by field, in one place.
"""

from __future__ import annotations

import copy
import os
import re
import time
from collections import Counter
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

from repfx.capture.export import Captured, capture
from repfx.errors import CaptureError
from repfx.passes import run_pipeline
from repfx.passes.kept_ops import account
from repfx.report import KeptOp, Refusal, Report, Rewrite
from repfx.settings import LOCAL_PROOF_TRIALS, Settings
from repfx.verify.local import LocalProver
from repfx.verify.mismatch import discontinuous_after_rewrites, judge
from repfx.verify.numeric import copy_inputs, input_sets as seeded_sets, verify
from repfx.verify.opcount import count_ops, summarize

REPORT_ATTRIBUTE = "repfx_report"
LATER_ROUND_CODES = ("local-proof", "param-growth")  # refusals a round after the first can add  # the one home of a result's Report, whole or folded in parts


class Laps:
    """Seconds per phase, into ``report.seconds``: the one stopwatch of the pipeline."""

    def __init__(self, report: Report) -> None:
        self.report, self.start = report, time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.report.seconds[phase] = self.report.seconds.get(phase, 0.0) + now - self.start
        self.start = now


def attach(result: torch.nn.Module, report: Report) -> torch.nn.Module:
    """Give ``result`` its report (``result.repfx_report``; a GraphModule's ``meta["repfx"]`` is the same object)."""
    setattr(result, REPORT_ATTRIBUTE, report)
    if isinstance(result, fx.GraphModule):
        result.meta["repfx"] = report
    return result


def report_of(result: torch.nn.Module) -> Report:
    """The Report of anything ``repfx.reparameterize`` returned."""
    return getattr(result, REPORT_ATTRIBUTE)


def fold_graph(model: Any, input_sets: list[tuple], settings: Settings) -> fx.GraphModule:
    """Capture ``model`` whole on the first example input set and fold it, proven and verified on every set;
    raises ``CaptureError`` when torch.export cannot capture it or one graph cannot hold every set."""
    settings.progress("capture")
    example_inputs = input_sets[0]
    report = Report(model=type(model).__name__)
    laps = Laps(report)
    _check_one_graph_holds(input_sets, settings.dynamic_batch)
    captured = capture(model, example_inputs, dynamic_batch=settings.dynamic_batch)
    report.model = model_name(model, captured.graph)
    report.mode_changes = list(captured.mode_changes)
    report.buffers_written = list(captured.buffers_written)
    report.notes += _non_finite_input_notes(example_inputs)
    laps.lap("capture")
    fold_captured(captured, input_sets, settings, report, laps)
    return attach(captured.graph, report)


def _check_one_graph_holds(input_sets: list[tuple], dynamic_batch: bool) -> None:
    """A captured graph holds the structure and shapes it was captured with (any batch when dynamic): example sets
    that differ are a ``CaptureError``, so that a module is folded in parts, one graph per call signature."""
    def shapes(inputs: tuple) -> tuple:
        leaves, spec = pytree.tree_flatten(inputs)
        return spec, [tuple(leaf.shape[1 if dynamic_batch else 0:]) if isinstance(leaf, torch.Tensor) else leaf
                      for leaf in leaves]

    first = shapes(input_sets[0])
    for index, inputs in enumerate(input_sets[1:], 2):
        if shapes(inputs) != first:
            raise CaptureError(f"example input set {index} differs in structure or shape from set 1, and one "
                               "captured graph holds one shape" + ("" if dynamic_batch else
                                                                   " (dynamic_batch=True lets the batch differ)"))


def fold_captured(captured: Captured, input_sets: list[tuple] | None, settings: Settings, report: Report,
                  laps: Laps) -> Report:
    """Fold ``captured.graph`` in place, prove and verify it on ``input_sets`` (example input sets), and fill
    ``report``.

    ``input_sets`` None (a graph whose inputs have no recorded shapes) folds without
    proofs and checks; the caller decides what an unproven result may be used for.
    """
    example_inputs, more = (input_sets[0], input_sets[1:]) if input_sets is not None else (None, [])
    gm = captured.graph
    reference = copy.deepcopy(gm)
    settings.progress("rewrite")
    checked = settings.verify and example_inputs is not None
    prover = LocalProver(seeded_sets(example_inputs, LOCAL_PROOF_TRIALS, more=more)) if checked else None
    results = run_pipeline(gm, settings.cost, prover=prover, eager_runtime=settings.eager_runtime)
    modules = module_paths(reference)
    report.iterations = len(results)
    report.rewrites = [Rewrite(r.kind, r.replaced_ops, r.kernel_shapes, r.ops_before, r.ops_after,
                               _module_of(modules, r.replaced_ops), r.params_before, r.params_after, r.growth_note)
                       for step in results for r in step.rewrites]
    # The first round sees the graph as captured (the user's node names) and is complete:
    # later rounds only confirm the fixed point and would repeat its refusals. Two kinds are
    # new there: failed local proofs, and a parameter bound met by a chain that only forms
    # once round one has folded its BatchNorms (FastViT's dw7x7 -> 1x1). A region refused
    # stays as written and is refused again in each round, so each refusal is reported once.
    refusals = list(results[0].refusals) + [refusal for step in results[1:] for refusal in step.refusals
                                            if refusal.code in LATER_ROUND_CODES]
    # What stays, each op with its reason, read off the graph as the fold left it (and before the refusals: the
    # ops of normalizations by the input's statistics were never candidates, so their refusals are noise).
    kept = account(gm, next((step.final for step in reversed(results) if step.final is not None), None),
                   [refusal for step in reversed(results) for refusal in step.refusals])
    modules |= module_paths(gm)
    report.refusals = [Refusal(refusal.node, refusal.reason, refusal.code, modules.get(refusal.node, ""))
                       for refusal in dict.fromkeys(refusals) if refusal.node not in kept.normalization]
    report.kept_ops = [KeptOp(op.node, op.kind, op.code, op.reason, modules.get(op.node, ""), op.refused_at)
                       for op in kept.kept]
    report.rule_counts = dict(sum((Counter(step.rule_counts) for step in results), Counter()))
    report.cost_rule = settings.cost.describe()
    report.decisions = [decision.to_dict() for decision in results[0].decisions]  # first round, as refusals
    laps.lap("rewrite")
    if prover is not None:  # the proofs ran inside the fold's rounds: shown as a phase of their own
        report.seconds["rewrite"] -= prover.seconds
        report.seconds["prove"] = prover.seconds
    if example_inputs is None:
        return report

    # Running a graph that writes its buffers advances them: every check runs on copies,
    # so the returned graph starts from the model's own state.
    on_copy = copy.deepcopy if captured.buffers_written else (lambda graph: graph)
    settings.progress("verify" if settings.verify else "count")
    if settings.verify:
        report.local_proofs = prover.summary
        extra_batch = 3 if settings.dynamic_batch else None
        stats = verify(on_copy(reference), on_copy(gm), example_inputs, rtol=settings.rtol, atol=settings.atol,
                       extra_batch=extra_batch, raise_on_mismatch=False, more=more)
        report.max_abs_error, report.max_rel_error, report.tolerance = (
            stats.max_abs_error, stats.max_rel_error, stats.tolerance)
        if stats.mismatches:
            report.verification_note = judge(stats, reference, gm, example_inputs, prover.summary, settings,
                                             discontinuous_after_rewrites(gm), extra_batch=extra_batch, more=more)
        ops_before, ops_after = stats.reference_ops, stats.candidate_ops  # counted while verifying
    else:
        ops_before = count_ops(on_copy(reference), copy_inputs(example_inputs))
        ops_after = count_ops(on_copy(gm), copy_inputs(example_inputs))
    laps.lap("verify" if settings.verify else "count")
    report.ops_before, report.ops_after = summarize(ops_before), summarize(ops_after)
    report.parameters_before = parameter_count(reference)
    report.parameters_after = parameter_count(gm)
    return report


# torch.export names a module reached through a sliced Sequential (``self.model[:-1]``, as ultralytics runs its
# layers) ``model.slice(None, -1, None).3``; the slice keeps the children's own names, so the path is ``model.3``.
_SLICE = re.compile(r"\.slice\([^)]*\)")


def module_paths(gm: fx.GraphModule) -> dict[str, str]:
    """Node name -> the path of the module that ran it (``stages.2.blocks.3.conv_kxk``), from the
    ``nn_module_stack`` torch.export records: what a person finds in their model, unlike aten node names."""
    paths = {}
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            paths[node.name] = _SLICE.sub("", list(stack.values())[-1][0])
    return paths


def _module_of(modules: dict[str, str], nodes: tuple[str, ...]) -> str:
    """The innermost module holding every node of a rewrite (``stages.0.block``), or "" when they share none."""
    found = [modules[node].split(".") for node in nodes if modules.get(node)]
    return ".".join(os.path.commonprefix(found)) if found else ""  # commonprefix compares any sequences


def model_name(model: Any, gm: fx.GraphModule) -> str:
    """The class of the model a person wrote: for a program, a GraphModule or TorchScript, the root class torch
    recorded (``nn_module_stack``; TorchScript's ``original_name``), not ``ExportedProgram``."""
    if isinstance(model, torch.jit.ScriptModule):
        return model.original_name
    if isinstance(model, torch.nn.Module) and not isinstance(model, fx.GraphModule):
        return type(model).__name__
    for node in gm.graph.nodes:
        for path, kind in (node.meta.get("nn_module_stack") or {}).values():
            if path == "":
                return str(getattr(kind, "__name__", kind)).rpartition(".")[2]
    return type(model).__name__


def _non_finite_input_notes(example_inputs: tuple) -> list[str]:
    """Example inputs with NaN/inf still work (equal non-finite outputs agree), but prove less: say so."""
    notes = []
    for index, leaf in enumerate(pytree.tree_leaves(example_inputs)):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and not bool(torch.isfinite(leaf).all()):
            notes.append(f"example input {index} holds NaN or inf values; the proofs at those positions rest "
                         "on the seeded random inputs")
    return notes


def parameter_count(gm: fx.GraphModule) -> int:
    """Floating elements of every tensor the graph reads (folded BN statistics vanish, so they count too)."""
    used = {node.target for node in gm.graph.nodes if node.op == "get_attr"}
    tensors = dict(gm.named_parameters()) | dict(gm.named_buffers())
    return sum(t.numel() for name, t in tensors.items() if name in used and t.is_floating_point())
