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

import copy
from typing import Any

import torch
from torch import fx

from repfx.api import LOCAL_PROOF_TRIALS
from repfx.errors import VerificationError
from repfx.verify.local import LocalProver
from repfx.verify.mismatch import judge
from repfx.verify.numeric import input_sets, verify

_installed: list[Any] = []


def repfx_lowering_pass(gm: fx.GraphModule, settings: Any = None) -> fx.GraphModule:
    """torch-tensorrt's lowering-pass signature ``(gm, settings) -> gm``: fold every linear region of ``gm``."""
    from repfx.passes import run_to_fixed_point

    inputs = _inputs_from_placeholder_meta(gm)
    original = copy.deepcopy(gm) if inputs is not None else None
    prover = LocalProver(input_sets(inputs, LOCAL_PROOF_TRIALS)) if inputs is not None else None
    results = run_to_fixed_point(gm, "macs", prover=prover)
    if not any(step.modified for step in results):
        return gm
    gm.graph.lint()
    gm.recompile()
    if original is None:
        raise VerificationError("repfx lowering pass: the graph's placeholders carry no shapes (meta['val']), "
                                "so the rewrite cannot be verified; refusing to hand an unverified graph on")
    stats = verify(original, gm, inputs, raise_on_mismatch=False)
    if stats.mismatches:  # accepted (with a warning) only when rounding explains it, as in reparameterize
        judge(stats, original, gm, inputs, prover.summary, rtol=None, atol=None, extra_batch=None, strict=False)
    return gm


def _inputs_from_placeholder_meta(gm: fx.GraphModule) -> tuple | None:
    """Seeded random tensors shaped like each placeholder's fake value (symbolic sizes at their hints)."""
    generator = torch.Generator().manual_seed(0)
    inputs = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor):
            return None
        shape = [int(getattr(size, "node", None).hint) if isinstance(size, torch.SymInt) else int(size)
                 for size in value.shape]
        tensor = torch.randn(shape, generator=generator) if value.is_floating_point() else torch.zeros(shape)
        inputs.append(tensor.to(dtype=value.dtype, device=value.device))
    return tuple(inputs)


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
