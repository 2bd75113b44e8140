"""Loading the model file the CLI is given, without running code the user did not agree to.

A TorchScript archive and an ExportedProgram (.pt2) are data: loading them
deserializes graphs, not Python. A pickled ``nn.Module`` (``torch.save(model)``)
is Python code execution on load, so it is refused unless ``--trust-pickle``.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import first_line


class BadInput(ValueError):
    """The CLI's input is unusable; the message is one line a user can act on (exit code 2)."""


@dataclass
class LoadedModel:
    model: Any  # nn.Module, ExportedProgram or ScriptModule
    kind: str  # "torchscript", "exported_program", "pickle"
    example_inputs: tuple | None  # what the file says about its inputs, when it says anything


def load_model(path: Path, *, trust_pickle: bool = False) -> LoadedModel:
    if not path.exists():
        raise BadInput(f"{path}: no such file")
    if not path.is_file():
        raise BadInput(f"{path}: not a file")
    kind = _sniff(path)
    if kind == "exported_program":
        try:
            program = torch.export.load(str(path))
        except Exception as error:
            raise BadInput(f"{path}: not a loadable ExportedProgram ({first_line(error)})") from error
        return LoadedModel(program, kind, _program_example_inputs(program))
    if kind == "torchscript":
        try:
            return LoadedModel(torch.jit.load(str(path), map_location="cpu"), kind, None)
        except Exception as error:
            raise BadInput(f"{path}: not a loadable TorchScript archive ({first_line(error)})") from error
    if kind == "pickle":
        if not trust_pickle:
            raise BadInput(f"{path} is a pickled Python object (torch.save(model)); unpickling runs arbitrary code, "
                           "so it is refused. Save the model with torch.export.save or torch.jit.save, or pass "
                           "--trust-pickle if you trust this file.")
        try:
            model = torch.load(str(path), map_location="cpu", weights_only=False)
        except Exception as error:
            raise BadInput(f"{path}: unpickling failed ({first_line(error)})") from error
        if not isinstance(model, torch.nn.Module):
            raise BadInput(f"{path} holds a {type(model).__name__}, not an nn.Module (a state_dict needs the "
                           "model's code: build the model, load the weights, then torch.export.save it)")
        return LoadedModel(model, kind, None)
    raise BadInput(f"{path}: not a TorchScript archive, an ExportedProgram (.pt2) or a pickled module")


def _sniff(path: Path) -> str:
    """The archive kind from its contents (file suffixes lie: .pt is used for all three)."""
    if not zipfile.is_zipfile(path):
        with path.open("rb") as handle:
            head = handle.read(2)
        return "pickle" if head[:1] == b"\x80" else "unknown"  # protocol-2+ pickles start with PROTO 0x80
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    if any(name.endswith("archive_format") or "/models/" in name for name in names):
        return "exported_program"
    if any("/code/" in name for name in names):
        return "torchscript"
    if any(name.endswith("data.pkl") for name in names):
        return "pickle"
    return "unknown"


def _program_example_inputs(program: torch.export.ExportedProgram) -> tuple | None:
    """Example inputs saved with the program, else zeros shaped like its user-input placeholders."""
    stored = getattr(program, "example_inputs", None)
    if stored:
        args, kwargs = stored
        if not kwargs:
            return tuple(args)
    user_inputs = set(program.graph_signature.user_inputs)
    inputs = []
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in user_inputs:
            value = node.meta.get("val")
            if not isinstance(value, torch.Tensor):
                return None
            shape = [int(s.node.hint) if isinstance(s, torch.SymInt) and s.node.hint is not None else int(s)
                     for s in value.shape]
            inputs.append(torch.zeros(shape, dtype=value.dtype))
    return tuple(inputs) or None

