"""One line for existing torch-tensorrt scripts: ``repfx.integrations.torch_tensorrt.install()``.

It registers repfx as torch-tensorrt's first aten lowering pass, so
``torch_tensorrt.compile(model, ...)`` re-parameterizes every graph before
conversion. Lowering passes see the aten graph torch-tensorrt is about to convert,
with weights as ``get_attr`` constants, which is exactly the form repfx folds.

A lowering pass gets no example inputs, so verification draws seeded random
inputs from the shapes recorded on the graph's placeholders (``meta["val"]``)
proves each rewrite locally in float64 on them (``repfx.verify.local``), and compares
the graph before and after; a mismatch that rounding does not explain raises
``VerificationError`` instead of letting torch-tensorrt build a wrong engine.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from repfx.capture.export import Captured
from repfx.capture.inputs import placeholder_specs, random_inputs
from repfx.errors import VerificationError
from repfx.pipeline.graph import Laps, fold_captured
from repfx.report import Report
from repfx.settings import Settings

_installed: list[Any] = []


def repfx_lowering_pass(gm: fx.GraphModule, settings: Any = None) -> fx.GraphModule:
    """torch-tensorrt's lowering-pass signature ``(gm, settings) -> gm``: fold every linear region of ``gm``.

    The same driver as ``repfx.reparameterize`` from its passes on (``fold_captured``), in place, on
    seeded inputs shaped like the placeholders; ``eager_runtime=False``: TensorRT runs the graph.
    """
    specs = placeholder_specs(gm.graph.find_nodes(op="placeholder"))  # weights are get_attr: all are inputs
    inputs = random_inputs(specs, seed=0) if specs is not None else None
    plan = Settings(eager_runtime=False, target="cuda" if torch.cuda.is_available() else None)  # TensorRT: CUDA
    report = Report(model=type(gm).__name__)
    fold_captured(Captured(gm), [inputs] if inputs is not None else None, plan.planned(inputs or ()), report,
                  Laps(report))
    if not report.rewrites:
        return gm
    gm.graph.lint()
    gm.recompile()
    if inputs is None:
        raise VerificationError("repfx lowering pass: the graph's placeholders carry no shapes (meta['val']), "
                                "so the rewrite cannot be verified; refusing to hand an unverified graph on")
    return gm


def install(index: int = 0) -> None:
    """Register ``repfx_lowering_pass`` with torch-tensorrt at ``index`` (idempotent)."""
    from repfx.backends.availability import require_torch_tensorrt

    require_torch_tensorrt()
    if _installed:
        return
    # The package star-imports this module, which does not re-export underscore names.
    from torch_tensorrt.dynamo.lowering.passes._aten_lowering_pass import _aten_lowering_pass

    _aten_lowering_pass(repfx_lowering_pass, index=index)
    _installed.append(repfx_lowering_pass)


__all__ = ["install", "repfx_lowering_pass"]
