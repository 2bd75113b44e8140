"""The two errors users can act on."""


class CaptureError(RuntimeError):
    """The model could not be captured into an aten graph (trace/export failed)."""


class VerificationError(RuntimeError):
    """The rewritten graph does not reproduce the original outputs within tolerance."""
