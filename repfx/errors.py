"""The errors users can act on, and the one-line form every error is shown in (``first_line``)."""


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


def first_line(error: BaseException | str, limit: int | None = 500, *, empty: str | None = None) -> str:
    """The first line of ``error``'s message, for one-line reports; chained causes keep the rest.

    A message with no text reads as ``empty`` or, if that is not given, the error's type
    name. ``limit`` cuts the line (None: the whole line, for messages whose end is a hint).
    """
    text = str(error).strip()
    if not text:
        return empty if empty is not None else type(error).__name__
    line = text.splitlines()[0]
    return line if limit is None else line[:limit]
