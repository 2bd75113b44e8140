"""Whether torch.save bytes hold only tensors and plain containers, and if not, what they would import.

The decision is torch's own weights-only unpickler (which builds tensors, containers and a
short list of allowed types, and refuses every other global). When it refuses, the pickle
streams are read statically with ``pickletools`` to name the globals they import, so that
a refusal says which code loading would have run.
"""

from __future__ import annotations

import io
import pickletools
import warnings
import zipfile
from collections.abc import Iterator

import torch

from repfx.errors import first_line


def weights_only_problem(payload: bytes) -> str | None:
    """None when the torch.save-format bytes hold only tensors and plain containers, else what they reference."""
    if not payload:
        return None  # torch reads empty sample inputs as {} and fails on other empty pickles
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # An explicit weights_only=True is kept even under TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD.
            torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True, mmap=False)
    except Exception as error:
        unsafe = _disallowed_globals(payload)
        if unsafe:
            return f"references {', '.join(unsafe)}, which loading would execute"
        return f"is not a plain-tensor pickle ({first_line(error, 200)}), so loading it could execute code"
    return None


def _disallowed_globals(payload: bytes) -> list[str]:
    """The globals the payload's pickles import that torch's weights-only unpickler does not allow (for messages)."""
    from torch import _weights_only_unpickler

    allowed = set(getattr(_weights_only_unpickler, "_get_allowed_globals", dict)())
    allowed |= {f"{getattr(g, '__module__', '')}.{getattr(g, '__qualname__', '')}"
                for g in torch.serialization.get_safe_globals() if not isinstance(g, tuple)}
    found = [name for pickled in _pickles_in(payload) for name in _pickle_globals(pickled)]
    return list(dict.fromkeys(name for name in found if name not in allowed))


def _pickles_in(payload: bytes) -> Iterator[bytes]:
    """The pickle streams of torch.save bytes: ``data.pkl`` of the zip format, else the legacy file itself."""
    buffer = io.BytesIO(payload)
    if not zipfile.is_zipfile(buffer):
        yield payload
        return
    with zipfile.ZipFile(buffer) as archive:
        for name in archive.namelist():
            if name.endswith(".pkl"):
                yield archive.read(name)


def _pickle_globals(pickled: bytes) -> list[str]:
    """``module.name`` of each global the pickle stream(s) import, read statically with pickletools.

    STACK_GLOBAL takes its names from the stack: the last two strings pushed (or fetched
    from the memo) stand in for them. Good enough to name the culprit in a message; the
    decision itself is the weights-only unpickler's.
    """
    found: list[str] = []
    stream = io.BytesIO(pickled)
    while stream.tell() < len(pickled):  # legacy torch.save writes several pickles back to back
        strings: list[str] = []
        memo: dict[int, str | None] = {}
        top: str | None = None  # the string the last opcode pushed, if it pushed one
        try:
            for opcode, arg, _ in pickletools.genops(stream):
                name = opcode.name
                if name in ("GLOBAL", "INST"):
                    found.append(arg.replace(" ", "."))
                elif name == "STACK_GLOBAL":
                    found.append(".".join(strings[-2:]))
                elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                    memo[len(memo) if arg is None else arg] = top
                    continue  # memoizing leaves the stack as it was
                elif name in ("GET", "BINGET", "LONG_BINGET") and memo.get(arg):
                    strings.append(memo[arg])
                    top = memo[arg]
                    continue
                elif isinstance(arg, str) and ("UNICODE" in name or "STRING" in name):
                    strings.append(arg)
                    top = arg
                    continue
                top = None
        except Exception:
            break  # raw storage bytes follow the pickles of the legacy format
    return found
