"""repfx: exact, generic structural re-parameterization of traced PyTorch models.

    gm = repfx.reparameterize(model, (x,))   # plain graph, verified, gm.meta["repfx"] is the report
    print(repfx.explain(model, (x,)))         # what would be merged and refused, and why
"""

from .api import explain, reparameterize
from .errors import CaptureError, VerificationError
from .report import Refusal, Report, Rewrite

__all__ = ["CaptureError", "Refusal", "Report", "Rewrite", "VerificationError", "explain", "reparameterize"]
__version__ = "0.1.0"
