"""The errors users can act on."""


class CaptureError(RuntimeError):
    """The model could not be captured into an aten graph (trace/export failed)."""


class VerificationError(RuntimeError):
    """The rewritten graph does not reproduce the original outputs within tolerance."""


class BackendUnavailable(RuntimeError):
    """A lowering backend's dependency (torch_tensorrt, TensorRT, a CUDA device, onnxruntime) is missing.

    The message names the missing piece and how to get it; nothing was built.
    """


class LoweringError(RuntimeError):
    """A backend could not lower the plain graph (export to ONNX, TensorRT build); names the step."""


def first_line(error: BaseException, limit: int = 500) -> str:
    """The first line of ``error``'s message (or its type), for one-line reports; chained causes keep the rest."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:limit]
