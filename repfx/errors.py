"""The errors users can act on, the one-line form every error is shown in (``first_line``), and ``warn_user``."""

import os
import sys
import warnings
from pathlib import Path


class CaptureError(RuntimeError):
    """The model could not be captured into an aten graph (trace/export failed)."""


class InputMismatch(CaptureError):
    """The example inputs do not fit the model: ``problem`` says how, ``shapes`` (one per input, where they can
    be told) or ``names`` (forward's arguments) what would. A command states the fix in its own options."""

    def __init__(self, problem: str, *, shapes: list[str] | None = None, names: list[str] | None = None) -> None:
        self.problem, self.shapes, self.names = problem, shapes, names
        if shapes:
            fix = f"pass example inputs of shape {', '.join(shapes)}"
        elif names:
            fix = f"pass one example input per argument, in this order: {', '.join(names)}"
        else:
            fix = "pass example inputs the model takes"
        super().__init__(f"{problem}: {fix}")


class VerificationError(RuntimeError):
    """The rewritten graph does not reproduce the original outputs within tolerance."""


class BackendUnavailable(RuntimeError):
    """A lowering backend's dependency (torch_tensorrt, TensorRT, a CUDA device, onnxruntime) is missing.

    The message names the missing piece and how to get it; nothing was built.
    """


class LoweringError(RuntimeError):
    """A backend could not lower the plain graph (export to ONNX, TensorRT build); names the step."""


class CalibrationError(ValueError):
    """INT8 calibration data is missing or does not fit the model's inputs; the message names what to pass.

    A ValueError: the data is an argument the caller gave (or left out), not a failure of repfx.
    """


class Int8TargetMissed(VerificationError):
    """The INT8 model misses its held-out target (top-1 agreement, SNR against the fp32 plain graph) even with
    the sensitivity fallback and equalization; the message gives the numbers. Nothing was deployed or written."""


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


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` pointing at the caller's own line: the first frame outside repfx and torch.

    A ``stacklevel`` counted by hand breaks whenever a call moves (and pointed warnings at
    repfx's own lines); walking out of the packages is right from every entry point.
    """
    import torch

    own = tuple(str(Path(path).parent) + os.sep for path in (__file__, torch.__file__)) + (
        str(Path(__file__).parent.parent / "passes") + os.sep,)  # a checkout maps passes/ into repfx
    level, frame = 2, sys._getframe(1)  # stacklevel 2 is the frame that called warn_user
    while frame is not None and frame.f_code.co_filename.startswith(own):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
