"""Loading the model file the CLI is given, without running code the user did not agree to.

Security model. The file is read once into memory; every check and the load itself see
those same bytes, so a file swapped on disk between check and load changes nothing.
``trust_pickle`` (``--trust-pickle``) skips every check and loads as torch does.

* ExportedProgram (``torch.export.save``, .pt2): ``torch.export.load`` runs code from the
  archive in several places; ``repfx.capture.pt2_safety`` checks each of them, on the bytes
  before loading and on the program after, before anything runs it.
* TorchScript (``torch.jit.save``): ``torch.jit.load`` deserializes with TorchScript's own
  unpickler, which builds tensors, containers and the archive's TorchScript classes, never
  Python objects or callables, and the only code it runs is TorchScript (registered
  operators, no Python). It is allowed.
* A pickled ``nn.Module`` (``torch.save(model)``) is Python code execution on load: refused
  unless ``trust_pickle``.

Archive kinds are told apart by the formats' own markers, relative to the one top-level
folder every member of a torch zip lives in: a PT2 archive has ``archive_format`` saying
"pt2"; a TorchScript archive has ``constants.pkl`` and ``code/``; a ``torch.save`` zip has
``data.pkl`` and neither. A legacy (non-zip) ``torch.save`` file is a pickle (protocol 2+
starts with 0x80).
"""

from __future__ import annotations

import io
import logging
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.export.pt2_archive import constants as pt2

from repfx.capture.failure import loggers_at
from repfx.capture.inputs import recorded_inputs
from repfx.capture.pt2_safety import Unsafe, check_archive, check_loaded_program
from repfx.errors import first_line

TRUST_HINT = "refused (pass --trust-pickle if you trust this file)"
PICKLE_PROTOCOL_2_PLUS = b"\x80"  # the PROTO opcode every protocol-2+ pickle starts with
QUIET_TORCH_LOGGERS = ("torch.export", "torch.export.pt2_archive._package", "torch._export.serde.serialize")


class BadInput(ValueError):
    """The CLI's input is unusable; the message is one line a user can act on (exit code 2)."""


@dataclass
class LoadedModel:
    model: Any  # nn.Module, ExportedProgram or ScriptModule
    kind: str  # "torchscript", "exported_program", "pickle"
    example_inputs: tuple | None  # what the file says about its inputs, when it says anything


def load_model(path: Path, *, trust_pickle: bool = False) -> LoadedModel:
    """The model in ``path``; code in the file runs only with ``trust_pickle`` (see the module docstring)."""
    data = _read(path)
    kind = sniff_kind(data)
    if kind == "exported_program":
        program = _load_exported_program(path, data, trust_pickle)
        return LoadedModel(program, kind, recorded_inputs(program))
    if kind == "torchscript":
        try:
            return LoadedModel(torch.jit.load(io.BytesIO(data), map_location="cpu"), kind, None)
        except Exception as error:
            raise BadInput(f"{path}: not a loadable TorchScript archive ({first_line(error)})") from error
    if kind == "pickle":
        return LoadedModel(_load_pickled_module(path, data, trust_pickle), kind, None)
    raise BadInput(f"{path}: {_what_it_is(data)}")


def _what_it_is(data: bytes) -> str:
    """Why a file is none of the formats repfx reads, as far as its bytes tell: a zip archive cut short, or an
    ONNX model (which repfx does not fold: it is already past PyTorch)."""
    if data[:4] == b"PK\x03\x04":
        return ("a zip archive with no directory at its end: a .pt2 or TorchScript file cut short (an interrupted "
                "copy or download?); copy it again")
    if _is_onnx(data):
        return ("an ONNX model; repfx folds PyTorch models: pass the ExportedProgram (.pt2, torch.export.save) "
                "or TorchScript archive the ONNX file was made from")
    return "not a TorchScript archive, an ExportedProgram (.pt2) or a pickled module"


def _is_onnx(data: bytes) -> bool:
    import onnx
    from google.protobuf.message import DecodeError

    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, ValueError):
        return False
    return model.ir_version > 0 and len(model.graph.node) > 0


def _read(path: Path) -> bytes:
    """The whole file, read once: checks and load must see the same bytes."""
    if not path.exists():
        raise BadInput(f"{path}: no such file")
    if not path.is_file():
        raise BadInput(f"{path}: not a file")
    try:
        return path.read_bytes()
    except OSError as error:
        raise BadInput(f"{path}: cannot be read ({first_line(error)})") from error


# --- what kind of file ------------------------------------------------------------------------------------------

def sniff_kind(data: bytes) -> str:
    """``exported_program``, ``torchscript``, ``pickle`` or ``unknown``, from the formats' markers (suffixes lie)."""
    buffer = io.BytesIO(data)
    if not zipfile.is_zipfile(buffer):
        return "pickle" if data[:1] == PICKLE_PROTOCOL_2_PLUS else "unknown"
    try:
        with zipfile.ZipFile(buffer) as archive:
            members = _relative_members(archive.namelist())
            if members is None:
                return "unknown"
            if pt2.ARCHIVE_FORMAT_PATH in members:
                marker = archive.read(members[pt2.ARCHIVE_FORMAT_PATH])
                return "exported_program" if marker == pt2.ARCHIVE_FORMAT_VALUE.encode() else "unknown"
    except (zipfile.BadZipFile, OSError, ValueError):
        return "unknown"
    if "constants.pkl" in members and any(name.startswith("code/") for name in members):
        return "torchscript"
    if "data.pkl" in members:
        return "pickle"
    return "unknown"


def _relative_members(names: list[str]) -> dict[str, str] | None:
    """Member path relative to the archive's one top-level folder -> full name; None when torch's layout is broken.

    torch writes every member under a single ``<prefix>/`` folder and its reader strips it;
    a member outside it (or none at all) is not a torch archive. This also keeps a root-level
    ``version`` member, which would send ``torch.export.load`` to its deprecated pre-2.7
    loader, out of any archive that reaches it.
    """
    if not names or "/" not in names[0]:
        return None
    prefix = names[0].split("/", 1)[0] + "/"
    if not all(name.startswith(prefix) for name in names):
        return None
    return {name[len(prefix):]: name for name in names}


# --- ExportedProgram --------------------------------------------------------------------------------------------

def _load_exported_program(path: Path, data: bytes, trust_pickle: bool) -> torch.export.ExportedProgram:
    if not trust_pickle:
        try:
            check_archive(data)
        except Unsafe as unsafe:
            raise BadInput(f"{path}: {unsafe}; {TRUST_HINT}") from None
        except Exception as error:  # malformed beyond what the checks understand: refused either way
            raise BadInput(f"{path}: not a loadable ExportedProgram ({first_line(error)})") from error
    try:
        # torch.export.load logs tracebacks and warns on its way to an error (the CLI prints one line); with
        # --trust-pickle it also logs a warning whose own format string is broken (a traceback on stderr).
        with loggers_at(logging.CRITICAL, QUIET_TORCH_LOGGERS), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # about torch's internals, e.g. a graph it could not compile
            program = torch.export.load(io.BytesIO(data))
    except Exception as error:
        raise BadInput(f"{path}: not a loadable ExportedProgram ({first_line(error)})") from error
    if not trust_pickle:
        try:
            check_loaded_program(program)
        except Unsafe as unsafe:
            raise BadInput(f"{path}: {unsafe}; {TRUST_HINT}") from None
        except Exception as error:  # a program shaped unlike anything torch.export writes
            raise BadInput(f"{path}: the loaded program could not be checked ({first_line(error)}); "
                           f"{TRUST_HINT}") from error
    return program


# --- pickled module ---------------------------------------------------------------------------------------------

def _load_pickled_module(path: Path, data: bytes, trust_pickle: bool) -> torch.nn.Module:
    if not trust_pickle:
        raise BadInput(f"{path} is a pickled Python object (torch.save(model)); unpickling runs arbitrary code, "
                       "so it is refused. Save the model with torch.export.save or torch.jit.save, or pass "
                       "--trust-pickle if you trust this file.")
    try:
        model = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except AttributeError as error:  # pickle names classes by module path; a script's own are in __main__
        missing = re.search(r"Can't get attribute '([^']+)' on <module '([^']+)'", str(error))
        if missing is None:
            raise BadInput(f"{path}: unpickling failed ({first_line(error)})") from error
        name, module = missing.groups()
        where = ("defined in the script that saved it (__main__)" if module.split(".")[-1] == "__main__"
                 else f"of module {module}")
        raise BadInput(f"{path}: the pickle refers to class {name}, {where}, which cannot be imported here; "
                       f"save the model with torch.export.save instead, or load it where {name} is importable"
                       ) from error
    except Exception as error:  # unpickling runs the file's code: any error can come out of it
        raise BadInput(f"{path}: unpickling failed ({first_line(error)})") from error
    if not isinstance(model, torch.nn.Module):
        raise BadInput(f"{path} holds a {type(model).__name__}, not an nn.Module (a state_dict needs the "
                       "model's code: build the model, load the weights, then torch.export.save it)")
    return model
