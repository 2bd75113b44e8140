"""Partial capture: a model torch.export cannot capture whole, folded in the largest parts it can capture.

Detection models end in data-dependent post-processing (NMS, top-k, loops over
``nonzero()``, ``.item()``) that torch.export cannot trace, while their backbones and
heads, where the conv+BN pairs are, capture fine. When whole-model capture of a plain
``nn.Module`` fails, ``fold_in_parts``:

1. runs a deep copy of the model, in eval mode, once on the example inputs and records
   what each submodule is called with (``repfx.capture.calls``: args and kwargs, every
   call signature);
2. walks the module tree from the top, largest first. A submodule worth capturing (it
   holds a conv, BatchNorm or linear) is folded by the normal pipeline (``fold``:
   capture, passes with local proofs, the part's own end-to-end check) once per call
   signature; if one signature cannot be captured the submodule stays as written and its
   children are tried instead. Children of a folded part are not tried again. A part
   whose capture succeeds but where nothing folds stays as written too;
3. returns a copy of the model whose folded parts are ``FoldedPart`` stand-ins
   (``repfx.capture.folded_part``), checked end to end against the eval copy of the model
   as given (``repfx.capture.partial_check``). Its Report is the ``repfx_report`` attribute.
"""

from __future__ import annotations

import copy
import re
import time
import warnings
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
from repfx.capture.partial_check import add_parts, check_whole
from repfx.errors import CaptureError, first_line
from repfx.report import KeptPart, Report

Fold = Callable[[nn.Module, tuple], tuple[fx.GraphModule, Report]]  # the normal pipeline on one module
REPORT_ATTRIBUTE = "repfx_report"  # where a model folded in parts keeps its Report (an nn.Module has no .meta)
ALREADY_FOLDED = "already folded by repfx"
FOLDABLE = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.Linear)
_CAUSED_BY = re.compile(r"Caused by: \((?P<where>(?P<file>[^()\n]+):\d+ in [\w.<>]+)\)")
_TORCH = Path(torch.__file__).parent
_LOCATED = re.compile(r" at \S+:\d+ ")


@dataclass
class FoldedSubmodule:
    """One part: the submodule, what it was called with, and its plain graph and report per call signature."""

    name: str
    module: nn.Module
    calls: Calls
    graphs: dict[Signature, fx.GraphModule]
    reports: dict[Signature, Report]


class NothingToFold(Exception):
    """The submodule was captured, but no rewrite applies: replacing it would gain nothing."""


def can_fold_in_parts(model: Any) -> bool:
    """Partial capture is for ``nn.Module`` models: an ExportedProgram, a GraphModule or TorchScript is one graph."""
    model = getattr(model, "_orig_mod", model)
    return isinstance(model, nn.Module) and not isinstance(model, (fx.GraphModule, torch.jit.ScriptModule))


def report_of(result: nn.Module) -> Report:
    """The Report of what ``repfx.reparameterize`` returned: ``gm.meta["repfx"]``, or ``repfx_report`` of a
    model folded in parts."""
    if isinstance(result, fx.GraphModule):
        return result.meta["repfx"]
    return getattr(result, REPORT_ATTRIBUTE)


def is_folded_in_parts(result: nn.Module) -> bool:
    return not isinstance(result, fx.GraphModule) and isinstance(getattr(result, REPORT_ATTRIBUTE, None), Report)


def fold_in_parts(model: nn.Module, example_inputs: tuple, blocker: CaptureError, fold: Fold, *, verify: bool,
                  rtol: float | None, atol: float | None, strict: bool, dynamic_batch: bool = False,
                  progress: Callable[[str], None] = lambda phase: None) -> nn.Module:
    """A copy of ``model`` with its capturable parts folded and verified; ``blocker`` is the whole-model error.

    Raises ``blocker``'s message with a line saying why (``not_in_parts``) when folding in
    parts cannot help: no submodule captures and folds, the model does not run eagerly on
    the example inputs either, or a dynamic batch was asked for (each part is captured
    with the static shapes it was called with).
    """
    if dynamic_batch:
        raise not_in_parts(blocker, "it captures each part with the static shapes it was called with: drop "
                                    "dynamic_batch to fold it in parts") from blocker
    clock = time.perf_counter()
    model = getattr(model, "_orig_mod", model)
    given = _eval_copy(model)  # the model as given, in eval mode: the reference
    calls = _record(given, example_inputs, blocker)
    result = copy.deepcopy(given)  # never run, so it starts from the model's own state
    report = Report(model=type(model).__name__, capture_blocker=blocking_line(blocker))
    report.mode_changes = [str(change) for change in train_mode_changes(model)]
    clock = _lap(report, "capture", clock)

    progress("rewrite")
    folded, kept = choose_parts(result, calls, _folding(fold))
    if not folded and not any(part.reason == ALREADY_FOLDED for part in kept):
        raise not_in_parts(blocker, "no submodule of it captures and folds on its own ("
                           + "; ".join(f"{part.name}: {part.reason}" for part in kept[:3]) + ")") from blocker
    for part in folded:
        _install(result, part)
    add_parts(report, given, folded, kept)
    clock = _lap(report, "rewrite", clock)

    progress("verify" if verify else "count")
    check_whole(report, given, result, example_inputs, verify=verify, rtol=rtol, atol=atol, strict=strict)
    _lap(report, "verify" if verify else "count", clock)
    setattr(result, REPORT_ATTRIBUTE, report)
    return result


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


def warn_folded_in_parts(report: Report, stacklevel: int) -> None:
    """Say loudly that the result is not one graph, which line blocked that, and where the details are."""
    names = ", ".join(part.name for part in report.parts[:4]) + (", ..." if len(report.parts) > 4 else "")
    warnings.warn(f"repfx: torch.export cannot capture {report.model} whole ({report.capture_blocker}); folded it in "
                  f"parts: {len(report.parts)} folded ({names or 'none'}), {len(report.kept_parts)} left as written, "
                  f"see result.{REPORT_ATTRIBUTE} (partial=False makes this an error)", UserWarning,
                  stacklevel=stacklevel + 1)


def _record(given: nn.Module, example_inputs: tuple, blocker: CaptureError) -> dict[str, Calls]:
    try:
        return record_calls(copy.deepcopy(given), example_inputs)
    except Exception as error:
        raise not_in_parts(blocker, f"it needs one eager run on the example inputs, which failed: "
                                    f"{first_line(error, 200)}") from blocker


def not_in_parts(blocker: CaptureError, why: str) -> CaptureError:
    """The whole-model error, unchanged (its first line names the failing line), and why folding in parts did not
    help on a line of its own."""
    return CaptureError(f"{blocker}\nNot folded in parts either: {why}")


def _lap(report: Report, phase: str, start: float) -> float:
    now = time.perf_counter()
    report.seconds[phase] = report.seconds.get(phase, 0.0) + now - start
    return now


# --- which submodules become parts ----------------------------------------------------------------------------------

Attempt = Callable[[str, nn.Module, Calls], FoldedSubmodule]


def choose_parts(model: nn.Module, calls: dict[str, Calls],
                 attempt: Attempt) -> tuple[list[FoldedSubmodule], list[KeptPart]]:
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
            kept.append(KeptPart(name, "not called on the example inputs"))
            return
        if record is not None:
            try:
                folded.append(_attempt(attempt, name, module, record))
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


def _attempt(attempt: Attempt, name: str, module: nn.Module, record: Calls) -> FoldedSubmodule:
    if record.unsupported is not None:
        raise CaptureError(f"not captured: {record.unsupported}")
    return attempt(name, module, record)


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


def _folding(fold: Fold) -> Attempt:
    """The attempt that folds a submodule once per call signature with ``fold``."""
    def attempt(name: str, module: nn.Module, record: Calls) -> FoldedSubmodule:
        graphs, reports = {}, {}
        for index, (key, (args, kwargs)) in enumerate(record.examples.items()):
            target, inputs = (keyword_call(module), (args, kwargs)) if takes_keywords(key) else (module, args)
            try:
                graphs[key], reports[key] = fold(target, inputs)
            except CaptureError as error:
                which = (f" (call signature {index + 1} of {len(record.examples)}: inputs {describe(key)})"
                         if len(record.examples) > 1 else "")
                raise CaptureError(f"not captured{which}: {blocking_line(error)}") from error
        if not any(report.rewrites for report in reports.values()):
            raise NothingToFold("captured, but nothing folds (no region executes fewer ops when merged)")
        return FoldedSubmodule(name, module, record, graphs, reports)

    return attempt


def _install(model: nn.Module, part: FoldedSubmodule) -> None:
    """Put the part's stand-in wherever the submodule is held (a shared submodule has several names)."""
    stand_in = FoldedPart(part.name, part.module, part.graphs)
    paths = [name for name, module in model.named_modules(remove_duplicate=False) if module is part.module]
    for path in paths:
        parent, _, attribute = path.rpartition(".")
        setattr(model.get_submodule(parent), attribute, stand_in)
