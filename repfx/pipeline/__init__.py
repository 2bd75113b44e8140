"""The one driver: a model -> capture -> passes -> verify -> report, whole or in parts.

``run`` is what ``repfx.reparameterize``, ``explain``, ``compile``, ``export`` and the
dynamo backend call, with a ``repfx.settings.Settings`` built at their boundary: it
folds the model as one graph (``graph.fold_graph``) and, for an ``nn.Module`` that
torch.export cannot capture whole, folds it in parts with that same function
(``parts.fold_in_parts``). Every result carries its report in the same place
(``result.repfx_report``, ``report_of``). ``run_whole`` is ``run`` for callers that need
one graph (a .pt2, ONNX, TensorRT): it names the line that blocks the whole model and
the part to export instead.
"""

from __future__ import annotations

import time
from typing import Any

from torch import fx, nn

from repfx.capture.export import check_input_dtypes
from repfx.capture.inputs import as_input_sets
from repfx.errors import CaptureError
from repfx.pipeline.graph import REPORT_ATTRIBUTE, fold_graph, report_of
from repfx.pipeline.parts import (can_fold_in_parts, fold_in_parts, is_folded_in_parts, warn_folded_in_parts,
                                  whole_model_message)
from repfx.settings import Settings


def run(model: Any, example_inputs: Any, settings: Settings) -> nn.Module:
    """The plain model (a GraphModule, or a copy of the model with folded parts) with its report attached.

    ``example_inputs``: one set of positional arguments, or a list of such tuples
    (``capture.inputs.as_input_sets``), every one recorded, proven and verified."""
    sets = as_input_sets(example_inputs)
    check_input_dtypes(model, sets[0])  # before anything: folding in parts would only fail the same way
    settings = settings.planned(sets[0])
    start = time.perf_counter()
    try:
        return fold_graph(model, sets, settings)
    except CaptureError as error:
        if not settings.partial or not can_fold_in_parts(model):
            raise
        failed_capture = time.perf_counter() - start
        folded = fold_in_parts(model, sets, error, settings, fold_graph)
    report = report_of(folded)
    report.seconds = {"whole-model capture": failed_capture} | report.seconds
    warn_folded_in_parts(report)
    return folded


def run_whole(model: Any, example_inputs: Any, settings: Settings) -> fx.GraphModule:
    """``run`` as one graph; a model torch.export cannot capture whole raises ``CaptureError`` whose first line
    names the line that blocks it and the largest part that folds, to export instead (found by folding in parts
    without verification)."""
    try:
        return run(model, example_inputs, settings.replace(partial=False))
    except CaptureError as error:
        message = _whole_model_message(model, as_input_sets(example_inputs), error, settings)
        if message is None:
            raise
        raise CaptureError(message) from error


def _whole_model_message(model: Any, sets: list[tuple], error: CaptureError, settings: Settings) -> str | None:
    """What blocks capturing ``model`` whole and the part to export instead; None where it cannot be folded in parts."""
    if not can_fold_in_parts(model):
        return None
    quick = settings.planned(sets[0]).replace(verify=False, dynamic_batch=False, progress=None)
    try:
        folded = fold_in_parts(model, sets, error, quick, fold_graph)
    except CaptureError:
        return None
    return whole_model_message(report_of(folded))


__all__ = ["REPORT_ATTRIBUTE", "Settings", "is_folded_in_parts", "report_of", "run", "run_whole"]
