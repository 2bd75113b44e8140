"""A model torch.export cannot capture whole, folded in the largest parts it can capture.

Detection models end in data-dependent post-processing (NMS, top-k, loops over
``nonzero()``, ``.item()``) that torch.export cannot trace, while their backbones and
heads, where the conv+BN pairs are, capture fine. ``fold_in_parts``:

1. runs a deep copy of the model, in eval mode, once on the example inputs and records
   what each submodule is called with (``repfx.capture.calls``: args and kwargs, every
   call signature);
2. walks the module tree from the top, largest first. A submodule worth capturing (it
   holds a conv, BatchNorm or linear) is folded by the same driver as a whole model
   (``repfx.pipeline.graph.fold_graph``: capture, passes with local proofs, the part's
   own end-to-end check) once per call signature; if one signature cannot be captured
   the submodule stays as written and its children are tried instead. A part whose
   capture succeeds but where nothing folds stays as written too;
3. returns a copy of the model whose folded parts are ``FoldedPart`` stand-ins, checked
   end to end against the eval copy of the model as given, by the same verdict as a
   whole graph (``repfx.verify.mismatch.judge``). The parts' reports merge into the
   model's field by field (``Report.absorb``).

The code between the parts is the model's own Python, not a graph, so the
discontinuous ops that may turn rounding into different selections are those its
forward executed (counted while verifying), not those found downstream in a graph.
"""

from __future__ import annotations

import copy
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from repfx.capture.calls import Calls, Signature, describe, record_calls
from repfx.capture.export import _eval_copy
from repfx.capture.folded_part import FoldedPart, keyword_call, takes_keywords
from repfx.capture.model_state import train_mode_changes
from repfx.errors import CaptureError, first_line, warn_user
from repfx.pipeline.graph import REPORT_ATTRIBUTE, Laps, attach, report_of
from repfx.report import KeptPart, Part, Report
from repfx.settings import Settings
from repfx.verify.mismatch import DISCONTINUOUS, judge
from repfx.verify.numeric import copy_inputs, verify
from repfx.verify.opcount import count_ops, summarize

Fold = Callable[[nn.Module, list[tuple], Settings], fx.GraphModule]  # the driver on one module: a graph, its report
ALREADY_FOLDED = "already folded by repfx"
FOLDABLE = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.Linear)
# Executed op names that select (their count loses the overload, so max/min, continuous unless .dim, are left out).
SELECTING = (frozenset(DISCONTINUOUS) - {"max", "min"}) | {"nms", "batched_nms"}
_CAUSED_BY = re.compile(r"Caused by: \((?P<where>(?P<file>[^()\n]+):\d+ in [\w.<>]+)\)")
_TORCH = Path(torch.__file__).parent
_LOCATED = re.compile(r" at \S+:\d+ ")


@dataclass
class FoldedSubmodule:
    """One part: the submodule, what it was called with, and its plain graph per call signature."""

    name: str
    module: nn.Module
    calls: Calls
    graphs: dict[Signature, fx.GraphModule]


class NothingToFold(Exception):
    """The submodule was captured, but no rewrite applies: replacing it would gain nothing."""


def can_fold_in_parts(model: Any) -> bool:
    """Partial capture is for ``nn.Module`` models: an ExportedProgram, a GraphModule or TorchScript is one graph."""
    model = getattr(model, "_orig_mod", model)
    return isinstance(model, nn.Module) and not isinstance(model, (fx.GraphModule, torch.jit.ScriptModule))


def is_folded_in_parts(result: nn.Module) -> bool:
    return not isinstance(result, fx.GraphModule) and isinstance(getattr(result, REPORT_ATTRIBUTE, None), Report)


def fold_in_parts(model: nn.Module, input_sets: list[tuple], blocker: CaptureError, settings: Settings,
                  fold: Fold) -> nn.Module:
    """A copy of ``model`` with its capturable parts folded by ``fold`` and verified; ``blocker`` is the
    whole-model error.

    Raises ``blocker``'s message with a line saying why (``not_in_parts``) when folding in
    parts cannot help: no submodule captures and folds, the model does not run eagerly on
    the example inputs either, or a dynamic batch was asked for (each part is captured
    with the static shapes it was called with).
    """
    if settings.dynamic_batch:
        raise not_in_parts(blocker, "it captures each part with the static shapes it was called with: drop "
                                    "dynamic_batch to fold it in parts") from blocker
    model = getattr(model, "_orig_mod", model)
    report = Report(model=type(model).__name__, capture_blocker=blocking_line(blocker))
    laps = Laps(report)
    given = _eval_copy(model)  # the model as given, in eval mode: the reference
    calls = _record(given, input_sets, blocker)
    result = copy.deepcopy(given)  # never run, so it starts from the model's own state
    report.mode_changes = train_mode_changes(model)
    laps.lap("capture")

    settings.progress("rewrite")
    part_settings = settings.replace(dynamic_batch=False, progress=None)  # phases are the whole model's
    unreached = ("not called on the example inputs" if len(input_sets) == 1 else
                 f"not called on any of the {len(input_sets)} example input sets")
    folded, kept = choose_parts(result, calls, _folding(fold, part_settings), unreached)
    if not folded and not any(part.reason == ALREADY_FOLDED for part in kept):
        raise not_in_parts(blocker, "no submodule of it captures and folds on its own ("
                           + "; ".join(f"{part.name}: {part.reason}" for part in kept[:3]) + ")") from blocker
    for part in folded:
        _install(result, part)
    _add_parts(report, given, calls, folded, kept)
    laps.lap("rewrite")
    proving = sum(report_of(graph).seconds.get("prove", 0.0) for part in folded for graph in part.graphs.values())
    if proving:  # the parts' proofs ran inside this phase: shown as a phase of their own, as for a whole graph
        report.seconds["rewrite"] -= proving
        report.seconds["prove"] = proving

    settings.progress("verify" if settings.verify else "count")
    check_whole(report, given, result, input_sets, settings)
    laps.lap("verify" if settings.verify else "count")
    return attach(result, report)


def blocking_line(error: CaptureError) -> str:
    """The capture error's first line; where it names no line of code, the one torch's message points at
    (``torchvision/ops/boxes.py:86 in batched_nms``), unless that is inside torch itself."""
    line = first_line(error, limit=None)
    cause = error.__cause__
    where = _CAUSED_BY.search(str(cause)) if cause is not None and not _LOCATED.search(line) else None
    if where is None or (_TORCH / where["file"]).exists():
        return line
    return f"{line} (raised in {where['where']})"


def whole_model_message(report: Report) -> str:
    """One line for export/ONNX/TensorRT: what stops a whole-model export, and the folded part to export instead."""
    head = f"{report.model} cannot be exported as one graph: {report.capture_blocker}"
    if not report.parts:
        return f"{head}; no submodule of it could be captured and folded either"
    largest = report.parts[0]
    return (f"{head}; export its largest folded part instead: model.{largest.name} ({largest.module}, called "
            f"with {' and '.join(largest.inputs)})")


def warn_folded_in_parts(report: Report) -> None:
    """Say loudly that the result is not one graph, which line blocked that, and where the details are."""
    names = ", ".join(part.name for part in report.parts[:4]) + (", ..." if len(report.parts) > 4 else "")
    warn_user(f"repfx: torch.export cannot capture {report.model} whole ({report.capture_blocker}); folded it in "
              f"parts: {len(report.parts)} folded ({names or 'none'}), {len(report.kept_parts)} left as written, "
              f"see result.{REPORT_ATTRIBUTE} (partial=False makes this an error)")


def not_in_parts(blocker: CaptureError, why: str) -> CaptureError:
    """The whole-model error, unchanged (its first line names the failing line), and why folding in parts did not
    help on a line of its own."""
    return CaptureError(f"{blocker}\nNot folded in parts either: {why}")


def _record(given: nn.Module, input_sets: list[tuple], blocker: CaptureError) -> dict[str, Calls]:
    try:
        return record_calls(copy.deepcopy(given), input_sets)
    except Exception as error:  # the model's own forward, whatever it raises
        raise not_in_parts(blocker, f"it needs one eager run on the example inputs, which failed: "
                                    f"{first_line(error, 200)}") from blocker


# --- which submodules become parts ----------------------------------------------------------------------------------

Attempt = Callable[[str, nn.Module, Calls], FoldedSubmodule]


def choose_parts(model: nn.Module, calls: dict[str, Calls], attempt: Attempt,
                 unreached: str = "not called on the example inputs") -> tuple[list[FoldedSubmodule], list[KeptPart]]:
    """The largest submodules ``attempt`` folds (top-down, largest sibling first), and those left as written.

    ``attempt`` raises ``CaptureError`` (then the children are tried) or ``NothingToFold``.
    The model itself is not tried: its capture is what failed. A shared submodule is
    visited once, under its first name.
    """
    first_names = {id(module): name for name, module in model.named_modules()}
    folded: list[FoldedSubmodule] = []
    kept: list[KeptPart] = []
    visited: set[int] = set()

    def visit(name: str, module: nn.Module) -> None:
        if id(module) in visited or (not isinstance(module, FoldedPart) and not worth_capturing(module)):
            return
        visited.add(id(module))
        if isinstance(module, FoldedPart):
            kept.append(KeptPart(name, ALREADY_FOLDED))
            return
        record = calls.get(first_names[id(module)])
        if record is None and not any(called.startswith(f"{first_names[id(module)]}.") for called in calls):
            kept.append(KeptPart(name, unreached))
            return
        if record is not None:
            try:
                if record.unsupported is not None:
                    raise CaptureError(f"not captured: {record.unsupported}")
                folded.append(attempt(name, module, record))
                return
            except NothingToFold as reason:
                kept.append(KeptPart(name, str(reason)))
                return
            except CaptureError as error:
                kept.append(KeptPart(name, first_line(error, limit=None)))
        for child_name, child in _largest_first(module):
            visit(f"{name}.{child_name}", child)

    for child_name, child in _largest_first(model):
        visit(child_name, child)
    return folded, kept


def worth_capturing(module: nn.Module) -> bool:
    """Whether ``module`` holds something repfx folds: a conv, BatchNorm (torchvision's frozen one too) or linear,
    or a layer of the user's own with weights of two or more dims (one that calls ``F.conv2d``, say)."""
    if next(module.parameters(), None) is None:
        return False
    for sub in module.modules():
        if isinstance(sub, FOLDABLE) or "BatchNorm" in type(sub).__name__:
            return True
        if not type(sub).__module__.startswith("torch.") and any(p.dim() >= 2 for p in sub.parameters(recurse=False)):
            return True
    return False


def _largest_first(module: nn.Module) -> list[tuple[str, nn.Module]]:
    return sorted(module.named_children(), key=lambda item: -sum(p.numel() for p in item[1].parameters()))


def _folding(fold: Fold, settings: Settings) -> Attempt:
    """The attempt that folds a submodule once per call signature with ``fold``."""
    def attempt(name: str, module: nn.Module, record: Calls) -> FoldedSubmodule:
        graphs = {}
        for index, (key, (args, kwargs)) in enumerate(record.examples.items()):
            target, inputs = (keyword_call(module), (args, kwargs)) if takes_keywords(key) else (module, args)
            try:
                graphs[key] = fold(target, [inputs], settings)
            except CaptureError as error:
                which = (f" (call signature {index + 1} of {len(record.examples)}: inputs {describe(key)})"
                         if len(record.examples) > 1 else "")
                raise CaptureError(f"not captured{which}: {blocking_line(error)}") from error
        if not any(report_of(graph).rewrites for graph in graphs.values()):
            raise NothingToFold("captured, but nothing folds (no region executes fewer ops when merged)")
        return FoldedSubmodule(name, module, record, graphs)

    return attempt


def _install(model: nn.Module, part: FoldedSubmodule) -> None:
    """Put the part's stand-in wherever the submodule is held (a shared submodule has several names)."""
    stand_in = FoldedPart(part.name, part.module, part.graphs)
    paths = [name for name, module in model.named_modules(remove_duplicate=False) if module is part.module]
    for path in paths:
        parent, _, attribute = path.rpartition(".")
        setattr(model.get_submodule(parent), attribute, stand_in)


# --- the check and the report -----------------------------------------------------------------------------------------

def check_whole(report: Report, given: nn.Module, folded: nn.Module, input_sets: list[tuple],
                settings: Settings) -> None:
    """Compare ``folded`` with ``given`` on every example input set (copies of both run: a forward may write state)
    and count executed ops on the first."""
    example_inputs, more = input_sets[0], input_sets[1:]
    if not settings.verify:
        report.ops_before = summarize(count_ops(copy.deepcopy(given), copy_inputs(example_inputs)))
        report.ops_after = summarize(count_ops(copy.deepcopy(folded), copy_inputs(example_inputs)))
        return
    stats = verify(copy.deepcopy(given), copy.deepcopy(folded), example_inputs, rtol=settings.rtol,
                   atol=settings.atol, raise_on_mismatch=False, more=more)
    report.max_abs_error, report.max_rel_error, report.tolerance = (
        stats.max_abs_error, stats.max_rel_error, stats.tolerance)
    report.ops_before, report.ops_after = summarize(stats.reference_ops), summarize(stats.candidate_ops)
    if stats.mismatches:
        selecting = sorted(name for name in stats.candidate_ops if name in SELECTING)
        selection = (f"the model's forward runs discontinuous ops ({', '.join(selecting[:8])}) on what the parts "
                     "compute, which turn fp32 rounding into different selections") if selecting else None
        report.verification_note = judge(stats, given, folded, example_inputs, report.local_proofs, settings,
                                         selection, in_parts=True, more=more)


def _add_parts(report: Report, given: nn.Module, calls: dict[str, Calls], folded: list[FoldedSubmodule],
               kept: list[KeptPart]) -> None:
    """Each part's report absorbed into the model's (node names get the part's name: ``backbone/convolution_3``),
    a ``Part`` entry per part with its executed ops over all its calls, and the parameters the model reads."""
    changed = 0
    for part in sorted(folded, key=lambda part: -_elements(part.module)):
        before, after = Counter(), Counter()
        for key, graph in part.graphs.items():
            part_report = report_of(graph)
            calls_made = part.calls.counts[key]
            before.update({name: count * calls_made for name, count in part_report.ops_before.items()})
            after.update({name: count * calls_made for name, count in part_report.ops_after.items()})
            report.absorb(part.name, part_report)
        reports = [report_of(graph) for graph in part.graphs.values()]
        report.parts.append(Part(part.name, type(part.module).__name__, sum(part.calls.counts.values()),
                                 len(reports), tuple(describe(key) for key in part.graphs), dict(before),
                                 dict(after), sum(len(r.rewrites) for r in reports)))
        changed += sum(r.parameters_after for r in reports) - reports[0].parameters_before
    report.kept_parts = list(kept)
    report.parameters_before = _elements_read(given, calls)
    report.parameters_after = report.parameters_before + changed


def _elements_read(model: nn.Module, calls: dict[str, Calls]) -> int:
    """Floating elements of the parameters and buffers of the modules the forward ran (the model and every
    submodule it called): what ``parameters_before`` counts for a graph, the tensors the computation reads."""
    ran = [model] + [model.get_submodule(name) for name in calls if name]
    tensors = {id(t): t for module in ran for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]}
    return sum(t.numel() for t in tensors.values() if t.is_floating_point())


def _elements(module: Any) -> int:
    """Floating elements of a module's parameters and buffers (BN statistics count: folding removes them)."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() for t in tensors if t.is_floating_point())
