"""torch.export's failures as one line a person can act on: what failed, and where in their code.

torch.export reports a failed capture with messages of several kilobytes (and logs
whole graph dumps on the way), while what a user needs is the line of their forward
that cannot be traced and the reason in a few words. That line is found in the
message torch writes for it ("The following call raised this error") or, failing
that, as the innermost frame of the traceback that is neither torch, repfx nor the
standard library. The full error stays chained as ``__cause__``; torch's own logging
during capture is held back unless ``REPFX_TRACEBACK=1``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sysconfig
import traceback
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

from repfx.errors import first_line

FIRST_LINE_LIMIT = 200  # the first line stays under this many characters
_RAISED_AT = re.compile(r'The following call raised this error:\s*File "(?P<file>[^"<][^"]*)", line (?P<line>\d+), '
                        r'in \w+[ \t]*\n[ \t]*(?P<code>[^\n]*)')
_SYMBOL = re.compile(r"(?<![\w.])s\d+(?![\w.])")  # torch's name for a symbolic size: s48
_NOT_USER_CODE = tuple(str(Path(path).resolve()) for path in (
    Path(torch.__file__).parent, Path(__file__).parent, sysconfig.get_paths()["stdlib"]))


def export_failure_message(name: str, error: BaseException, module: Any, inputs: tuple) -> str:
    """``torch.export could not capture NAME at FILE:LINE (`code`): reason`` + a ``Fix:`` line."""
    where = _user_frame(error)
    location = f" at {where[0]}:{where[1]} (`{where[2]}`)" if where else ""
    head = f"torch.export could not capture {name}{location}: "
    reason = torch_reason(error)
    if len(head) + len(reason) >= FIRST_LINE_LIMIT:
        reason = reason[:max(FIRST_LINE_LIMIT - 1 - len(head) - 3, 20)] + "..."
    return f"{head}{reason}\nFix: {_fix(error, module, inputs)}"


def torch_reason(error: BaseException) -> str:
    """The first line of torch's message, symbolic sizes (``s48``, a batch made dynamic) written as ``?``:
    they are torch's names for sizes the user never gave."""
    return _SYMBOL.sub("?", first_line(error))


def _user_frame(error: BaseException) -> tuple[str, int, str] | None:
    """(short file name, line, code) of the user's line that failed, if it can be told."""
    match = _RAISED_AT.search(str(error))
    if match:
        return _short(match["file"]), int(match["line"]), _clip(match["code"])
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        if frame.filename.startswith("<") or str(Path(frame.filename).resolve()).startswith(_NOT_USER_CODE):
            continue
        return _short(frame.filename), frame.lineno or 0, _clip(frame.line or "")
    return None


def _fix(error: BaseException, module: Any, inputs: tuple) -> str:
    mismatch = dtype_mismatch(module, inputs)
    if mismatch:
        return mismatch
    return ("make forward() traceable (no data-dependent Python control flow or .item() on tensors, "
            "see https://pytorch.org/docs/stable/export.html), or pass an ExportedProgram you exported yourself.")


def dtype_mismatch(module: Any, inputs: tuple) -> str | None:
    """Float inputs of another dtype than every float parameter: the usual cause of dtype errors in export."""
    weights = module.state_dict.values() if isinstance(module, torch.export.ExportedProgram) else [
        *getattr(module, "parameters", lambda: [])(), *getattr(module, "buffers", lambda: [])()]
    parameters = {t.dtype for t in weights if isinstance(t, torch.Tensor) and t.is_floating_point()}
    given = {leaf.dtype for leaf in pytree.tree_leaves(inputs)
             if isinstance(leaf, torch.Tensor) and leaf.is_floating_point()}
    if len(parameters) != 1 or not given or given <= parameters:
        return None
    (wanted,) = parameters
    shown = ", ".join(str(dtype) for dtype in sorted(given - parameters, key=str))
    return (f"the example inputs are {shown} but the model's parameters are {wanted}: pass inputs of the "
            f"model's dtype (x.to({wanted})) or convert a copy of the model (model.to(<dtype>)).")


def _short(filename: str) -> str:
    """A path relative to the working directory when inside it, else the last two components."""
    path = Path(filename)
    with contextlib.suppress(ValueError):
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    return str(Path(*path.parts[-2:]))


def _clip(code: str, limit: int = 60) -> str:
    code = code.strip()
    return code if len(code) <= limit else code[:limit - 3] + "..."


@contextlib.contextmanager
def quiet_torch_logs() -> Iterator[None]:
    """Hold torch's output back while capturing, unless REPFX_TRACEBACK is set.

    A failed export logs warnings and prints the partial graph straight to stderr
    (``partial_fx_graph``), often hundreds of kilobytes; the error itself keeps what
    matters. Loggers below ERROR are raised to ERROR and stderr is captured meanwhile.
    """
    if os.environ.get("REPFX_TRACEBACK"):
        yield
        return
    loud = [name for name in list(logging.Logger.manager.loggerDict) if name.split(".")[0] == "torch"
            and logging.getLogger(name).getEffectiveLevel() < logging.ERROR]
    with loggers_at(logging.ERROR, loud), contextlib.redirect_stderr(io.StringIO()):
        yield


@contextlib.contextmanager
def loggers_at(level: int, names: Iterable[str]) -> Iterator[None]:
    """The loggers ``names`` set to ``level`` inside the block; their own levels come back on the way out."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, previous in zip(loggers, levels):
            logger.setLevel(previous)
