"""repfx: exact, generic structural re-parameterization of traced PyTorch models, and its lowering.

    gm = repfx.reparameterize(model, (x,))    # plain graph, verified, gm.meta["repfx"] is the report
    print(repfx.explain(model, (x,)))         # what would be merged and refused, and why
    fast = repfx.compile(model, (x,))         # plain graph lowered to TensorRT / inductor / ONNX Runtime
    repfx.export(model, (x,), "deploy/")      # .pt2 + .onnx (+ TensorRT .engine where TensorRT exists)
    torch.compile(model, backend="repfx")     # re-parameterize inside torch.compile, then inductor
"""

from . import dynamo_backend
from .api import explain, reparameterize
from .errors import BackendUnavailable, CaptureError, LoweringError, VerificationError
from .exporter import ExportResult, export
from .lowering import DeployedModel, compile
from .report import Refusal, Report, Rewrite

dynamo_backend.register()

__all__ = ["BackendUnavailable", "CaptureError", "DeployedModel", "ExportResult", "LoweringError", "Refusal",
           "Report", "Rewrite", "VerificationError", "compile", "explain", "export", "reparameterize"]
__version__ = "0.2.0"
