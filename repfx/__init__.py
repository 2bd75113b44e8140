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
"""

from repfx.api import explain, reparameterize
from repfx.deploy.compile import DeployedModel, compile
from repfx.deploy.export import ExportResult, export
from repfx.errors import BackendUnavailable, CaptureError, LoweringError, VerificationError
from repfx.integrations import dynamo
from repfx.report import Refusal, Report, Rewrite

dynamo.register()

__all__ = ["BackendUnavailable", "CaptureError", "DeployedModel", "ExportResult", "LoweringError", "Refusal",
           "Report", "Rewrite", "VerificationError", "compile", "explain", "export", "reparameterize"]
__version__ = "0.2.0"
