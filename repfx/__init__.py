"""repfx: exact, generic structural re-parameterization of traced PyTorch models, and its lowering.

The pipeline, one package a stage: ``capture`` (model or file -> aten graph) ->
``repfx.passes`` (fold linear regions) -> ``verify`` (per-region and end-to-end
proofs) -> ``backends`` / ``deploy`` (lower and write). ``integrations`` hook the
same pipeline into torch.compile and torch-tensorrt; ``cli`` holds the commands.

    gm = repfx.reparameterize(model, (x,))    # plain graph, verified, gm.repfx_report is the report
    print(repfx.explain(model, (x,)))         # what would be merged and refused, and why
    fast = repfx.compile(model, (x,))         # plain graph lowered to TensorRT / inductor / ONNX Runtime
    repfx.export(model, (x,), "deploy/")      # .pt2 + .onnx (+ TensorRT .engine where TensorRT exists)
    torch.compile(model, backend="repfx")     # re-parameterize inside torch.compile, then inductor

The names above are imported on first use (PEP 562): ``import repfx`` itself imports no
torch, so ``python -m repfx.trt`` (which imports this package before its own code runs)
imports torch inside the command, where a Ctrl-C is one line like anywhere else.
"""

import importlib
import importlib.util

from repfx.integrations import register_dynamo_backend

# public name -> the module that defines it
_PUBLIC = {
    "explain": "repfx.api", "reparameterize": "repfx.api",
    "DeployedModel": "repfx.deploy.compile", "compile": "repfx.deploy.compile",
    "ExportResult": "repfx.deploy.export", "export": "repfx.deploy.export",
    "BackendUnavailable": "repfx.errors", "CaptureError": "repfx.errors", "LoweringError": "repfx.errors",
    "VerificationError": "repfx.errors", "CalibrationError": "repfx.errors", "Int8TargetMissed": "repfx.errors",
    "Refusal": "repfx.report", "Report": "repfx.report", "Rewrite": "repfx.report",
}

register_dynamo_backend()

__all__ = sorted(_PUBLIC)
__version__ = "0.2.0"


def __getattr__(name: str) -> object:
    """A public name or a subpackage (``repfx.capture``), imported when first read."""
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
