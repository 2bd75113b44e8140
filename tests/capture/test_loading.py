"""Loading a model file never runs code the file carries, unless ``--trust-pickle``.

Every crafted file here is a real ``torch.export.save`` archive with one thing changed so
that loading it would run ``touch MARKER`` (harmless, and observable): a pickled member,
a shape expression (``sympy.sympify`` evals it), a saved guard (``program.module()``
compiles it), a pytree context (imports a module), an opaque constant. Each is refused
with one line naming what it would run, and the marker never appears. The same file
loaded with ``trust_pickle=True`` does create the marker, which proves the payload is real
(and so that each refusal test can fail).

Archive kinds are recognized by their formats' markers: TorchScript archives of timm and
torchvision models, whose code paths contain ``/models/``, are TorchScript, and go through
the CLI end to end (the timm run takes 30-50 s on a busy machine: ``slow``).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shlex
import subprocess
import sys
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from google.protobuf import text_format
from torch import nn
from tritonclient.grpc import model_config_pb2

from repfx.capture.loading import BadInput, load_model, sniff_kind

SHAPE = (1, 3, 8, 8)
TS_SHAPE = (1, 3, 32, 32)  # the smallest input both nets take down to a 1x1 feature map
TIMEOUT_S = 600
SYSTEM = f"{os.system.__module__}.system"  # how a pickle names os.system here (posix.system)


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()).eval()


class AddOne(nn.Module):
    """``y[1:]`` ties y's batch to x's: the export records a guard and shape expressions."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + y[1:]


# --- building files -------------------------------------------------------------------------------------------------

class Touch:
    """Unpickling this runs ``touch MARKER``: the payload every crafted pickle carries."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def touch_command(marker: Path) -> str:
    """The same payload as Python source, for the places torch evaluates text."""
    return f"__import__('os').system({f'touch {shlex.quote(str(marker))}'!r})"


def with_payload(pickled: bytes, marker: Path) -> bytes:
    """``pickled`` with ``touch MARKER`` run (and its result popped) first: it still unpickles to the same object."""
    payload = pickle.dumps(Touch(marker), protocol=2)
    assert pickled[:2] == payload[:2] == b"\x80\x02", "both must be protocol-2 pickles"
    return pickled[:2] + payload[2:-1] + pickle.POP + pickled[2:]


def zip_members(data: bytes) -> tuple[str, dict[str, bytes]]:
    """(top-level prefix, {path relative to it: content}) of a torch zip."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        prefix = archive.namelist()[0].split("/", 1)[0] + "/"
        return prefix, {name[len(prefix):]: archive.read(name) for name in archive.namelist()}


def build_zip(prefix: str, members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for name, content in members.items():
            archive.writestr(prefix + name, content)
    return out.getvalue()


def edit_zip(data: bytes, edit: Callable[[dict[str, bytes]], None]) -> bytes:
    prefix, members = zip_members(data)
    edit(members)
    return build_zip(prefix, members)


def torch_save_with_payload(saved: bytes, marker: Path) -> bytes:
    """A ``torch.save`` zip whose data.pkl runs the payload before building the object it held."""
    def edit(members: dict[str, bytes]) -> None:
        members["data.pkl"] = with_payload(members["data.pkl"], marker)
    return edit_zip(saved, edit)


def torch_saved(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def edit_program_json(edit: Callable[[dict], None]) -> Callable[[dict[str, bytes]], None]:
    def on_members(members: dict[str, bytes]) -> None:
        program = json.loads(members["models/model.json"])
        edit(program)
        members["models/model.json"] = json.dumps(program).encode()
    return on_members


def first_expr_str(node) -> dict:
    """The first JSON object that holds an ``expr_str`` (a symbolic shape)."""
    stack = [node]
    while stack:
        item = stack.pop(0)
        if isinstance(item, dict):
            if "expr_str" in item:
                return item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    raise AssertionError("the program has no symbolic shape")


class Tagged(nn.Module):
    """Takes a string: ``program.module()`` guards that it is the one exported with."""

    def forward(self, x: torch.Tensor, tag: str) -> torch.Tensor:
        return x * 2


@dataclass
class Program:
    plain: bytes  # small_net exported with its sample inputs
    dynamic: bytes  # AddOne with a dynamic batch: shape expressions and a guard
    tagged: bytes  # Tagged, exported with tag="abc"
    inputs: tuple
    dynamic_inputs: tuple


@pytest.fixture(scope="module")
def programs() -> Program:
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    plain, dynamic, tagged = io.BytesIO(), io.BytesIO(), io.BytesIO()
    with torch.no_grad():
        torch.export.save(torch.export.export(small_net(), (x,)), plain)
        batch = torch.export.Dim("batch", min=2, max=32)
        inputs = (torch.randn(4, 3), torch.randn(5, 3))
        program = torch.export.export(AddOne(), inputs, dynamic_shapes=({0: batch}, {0: batch + 1}))
        assert program._guards_code, "the fixture is meant to carry a guard"
        torch.export.save(program, dynamic)
        torch.export.save(torch.export.export(Tagged(), (x, "abc")), tagged)
    return Program(plain.getvalue(), dynamic.getvalue(), tagged.getvalue(), (x,), inputs)


# --- the crafted files ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Craft:
    build: Callable[[Program, Path, Path], bytes]  # (programs, marker, tmp_path) -> file bytes
    says: tuple[str, ...]  # fragments the one-line refusal must contain
    runs_when_trusted: bool = True  # loading it trusted runs the payload (False: nothing real to run)
    run_module: bool = False  # the payload runs when program.module() is called, not at load


def _sample_inputs_zip(p: Program, marker: Path, _: Path) -> bytes:
    def edit(members: dict[str, bytes]) -> None:
        members["data/sample_inputs/model.pt"] = torch_save_with_payload(members["data/sample_inputs/model.pt"], marker)
    return edit_zip(p.plain, edit)


def _sample_inputs_legacy_pickle(p: Program, marker: Path, _: Path) -> bytes:
    def edit(members: dict[str, bytes]) -> None:
        members["data/sample_inputs/model.pt"] = pickle.dumps(Touch(marker), protocol=2)
    return edit_zip(p.plain, edit)


def _sample_inputs_renamed(p: Program, marker: Path, _: Path) -> bytes:
    """torch's zip reader finds members regardless of case: the check must look where torch looks."""
    def edit(members: dict[str, bytes]) -> None:
        original = members.pop("data/sample_inputs/model.pt")
        members["data/Sample_Inputs/model.pt"] = torch_save_with_payload(original, marker)
    return edit_zip(p.plain, edit)


def _pickled_weight(p: Program, marker: Path, _: Path) -> bytes:
    def edit(members: dict[str, bytes]) -> None:
        config = json.loads(members["data/weights/model_weights_config.json"])
        name, entry = next(iter(config["config"].items()))
        shape = [size["as_int"] for size in entry["tensor_meta"]["sizes"]]
        weight = torch.frombuffer(bytearray(members["data/weights/" + entry["path_name"]]), dtype=torch.float32)
        entry["use_pickle"] = True
        members["data/weights/model_weights_config.json"] = json.dumps(config).encode()
        members["data/weights/" + entry["path_name"]] = torch_save_with_payload(
            torch_saved(nn.Parameter(weight.reshape(shape).clone())), marker)
    return edit_zip(p.plain, edit)


def _legacy_constants(p: Program, marker: Path, _: Path) -> bytes:
    """A ``data/constants/<model>.pt`` file takes precedence over the constants config, and is unpickled."""
    def edit(members: dict[str, bytes]) -> None:
        members["data/constants/model.pt"] = torch_save_with_payload(torch_saved({}), marker)
    return edit_zip(p.plain, edit)


def _opaque_constant(p: Program, marker: Path, _: Path) -> bytes:
    def edit(members: dict[str, bytes]) -> None:
        config = json.loads(members["data/constants/model_constants_config.json"])
        config["config"]["extra"] = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True,
                                     "tensor_meta": None}
        members["data/constants/model_constants_config.json"] = json.dumps(config).encode()
        members["data/constants/opaque_obj_0"] = pickle.dumps(Touch(marker), protocol=2)
    return edit_zip(p.plain, edit)


def _shape_expression(p: Program, marker: Path, _: Path) -> bytes:
    def edit(program: dict) -> None:
        holder = first_expr_str(program)
        holder["expr_str"] = f"({touch_command(marker)}, {holder['expr_str']})[1]"
    return edit_zip(p.dynamic, edit_program_json(edit))


def _guard(p: Program, marker: Path, _: Path) -> bytes:
    def edit(program: dict) -> None:
        program["guards_code"] = [f"{touch_command(marker)} == 0"]
    return edit_zip(p.dynamic, edit_program_json(edit))


def marker_module(tmp_path: Path, marker: Path) -> str:
    """A module in tmp_path (put on sys.path by the tests) whose import touches the marker."""
    module = f"repfx_marker_{uuid.uuid4().hex}"
    (tmp_path / f"{module}.py").write_text(f"import enum, pathlib\npathlib.Path({str(marker)!r}).touch()\n"
                                           "factory = list\nclass Color(enum.Enum):\n    RED = 1\n")
    return module


def edit_kwargs_spec(edit: Callable[[dict], None]) -> Callable[[dict[str, bytes]], None]:
    """Edit the pytree spec of the program's keyword arguments (an empty dict: ``{"type": "builtins.dict"...}``)."""
    def on_program(program: dict) -> None:
        signature = program["graph_module"]["module_call_graph"][0]["signature"]
        protocol, spec = json.loads(signature["in_spec"])
        edit(spec["children_spec"][1])
        signature["in_spec"] = json.dumps([protocol, spec])
    return edit_program_json(on_program)


def _string_input(p: Program, marker: Path, _: Path) -> bytes:
    """A string input's recorded value is pasted, quoted, into the guard source ``program.module()`` compiles."""
    def edit(members: dict[str, bytes]) -> None:
        text = members["models/model.json"].decode()
        assert '"as_string": "abc"' in text, "the fixture's string input moved"  # in the graph and the signature
        value = json.dumps(f"abc' if ({touch_command(marker)} or True) else '")  # the guard still holds
        members["models/model.json"] = text.replace('"as_string": "abc"', f'"as_string": {value}').encode()
    return edit_zip(p.tagged, edit)


def _pytree_enum(p: Program, marker: Path, tmp_path: Path) -> bytes:
    """A pytree context naming an enum makes torch import its module: here, one that touches the marker."""
    module = marker_module(tmp_path, marker)

    def edit(kwargs: dict) -> None:
        kwargs["context"] = json.dumps([{"__enum__": True, "fqn": f"{module}:Color", "name": "RED"}])
    return edit_zip(p.plain, edit_kwargs_spec(edit))


def _pytree_defaultdict(p: Program, marker: Path, tmp_path: Path) -> bytes:
    """A defaultdict in the input spec makes torch import the module of its default factory."""
    module = marker_module(tmp_path, marker)

    def edit(kwargs: dict) -> None:
        kwargs["type"] = "collections.defaultdict"
        kwargs["context"] = {"default_factory_module": module, "default_factory_name": "factory", "dict_context": []}
    return edit_zip(p.plain, edit_kwargs_spec(edit))


def _forward_arg_name(p: Program, marker: Path, _: Path) -> bytes:
    """``program.module()`` pastes the saved argument names into the ``def forward(...)`` it compiles."""
    def edit(program: dict) -> None:
        signature = program["graph_module"]["module_call_graph"][0]["signature"]
        signature["forward_arg_names"] = [f"x={touch_command(marker)}"]
    return edit_zip(p.plain, edit_program_json(edit))


def _callable_argument(p: Program, marker: Path, _: Path) -> bytes:
    """An ``as_operator`` argument resolves to anything reachable from ``torch`` (torch.os.system here)."""
    def edit(program: dict) -> None:
        convolution = program["graph_module"]["graph"]["nodes"][0]
        assert convolution["target"] == "torch.ops.aten.conv2d.default", convolution["target"]
        convolution["inputs"][2]["arg"] = {"as_operator": "torch.os.system"}
    return edit_zip(p.plain, edit_program_json(edit))


def _aotinductor(p: Program, marker: Path, _: Path) -> bytes:
    def edit(members: dict[str, bytes]) -> None:
        members["data/aotinductor/model/model.so"] = b"\x7fELF"  # loading would dlopen it
    return edit_zip(p.plain, edit)


CRAFTS = {
    "sample_inputs": Craft(_sample_inputs_zip, ("member data/sample_inputs/model.pt", f"references {SYSTEM}")),
    "sample_inputs_legacy_pickle": Craft(_sample_inputs_legacy_pickle,
                                         ("member data/sample_inputs/model.pt", f"references {SYSTEM}")),
    "sample_inputs_other_case": Craft(_sample_inputs_renamed, ("data/sample_inputs/model.pt", SYSTEM)),
    "pickled_weight": Craft(_pickled_weight, ("member data/weights/weight_0", f"references {SYSTEM}")),
    "legacy_constants": Craft(_legacy_constants, ("member data/constants/model.pt", f"references {SYSTEM}")),
    "opaque_constant": Craft(_opaque_constant, ("member data/constants/opaque_obj_0", "pickled Python object")),
    "shape_expression": Craft(_shape_expression, ("member models/model.json", "shape expression")),
    "guard": Craft(_guard, ("guard", "__import__"), run_module=True),
    "string_input": Craft(_string_input, ("input tag", "__import__"), run_module=True),
    "pytree_enum": Craft(_pytree_enum, ("member models/model.json", "enum", "import")),
    "pytree_defaultdict": Craft(_pytree_defaultdict, ("member models/model.json", "defaultdict", "import")),
    "forward_arg_name": Craft(_forward_arg_name, ("argument name", "__import__"), runs_when_trusted=False),
    "callable_argument": Craft(_callable_argument, ("node conv2d passes", SYSTEM), runs_when_trusted=False),
    "aotinductor": Craft(_aotinductor, ("member data/aotinductor/model/model.so",), runs_when_trusted=False),
}


def craft(name: str, programs: Program, tmp_path: Path) -> tuple[Path, Path]:
    """(crafted .pt2, its marker path) in tmp_path."""
    marker, path = tmp_path / f"{name}.marker", tmp_path / f"{name}.pt2"
    path.write_bytes(CRAFTS[name].build(programs, marker, tmp_path))
    return path, marker


def one_line_refusal(path: Path) -> str:
    with pytest.raises(BadInput) as caught:
        load_model(path)
    message = str(caught.value)
    assert "\n" not in message, message
    assert message.startswith(f"{path}: ") and message.endswith("(pass --trust-pickle if you trust this file)"), message
    return message


# --- refused without trust ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CRAFTS))
def test_crafted_program_is_refused_in_one_line_without_running_it(programs, tmp_path, monkeypatch, name):
    monkeypatch.syspath_prepend(str(tmp_path))  # where the pytree cases' marker module waits to be imported
    path, marker = craft(name, programs, tmp_path)
    message = one_line_refusal(path)
    assert all(fragment in message for fragment in CRAFTS[name].says), message
    assert not marker.exists(), "the payload ran"


@pytest.mark.parametrize("name", [name for name, case in CRAFTS.items() if case.runs_when_trusted])
def test_trusted_crafted_program_runs_its_payload(programs, tmp_path, monkeypatch, name):
    """The payloads are real: with trust_pickle the full load (and module()) runs them."""
    monkeypatch.syspath_prepend(str(tmp_path))
    path, marker = craft(name, programs, tmp_path)
    try:
        loaded = load_model(path, trust_pickle=True)
        if CRAFTS[name].run_module:
            loaded.model.module()(*loaded.example_inputs)
    except BadInput:
        pass  # some payloads leave a program torch cannot finish loading; they ran all the same
    assert marker.exists(), "the test's payload never ran: the refusal test proves nothing"


def test_trusted_crafted_sample_inputs_still_load_completely(programs, tmp_path):
    path, marker = craft("sample_inputs", programs, tmp_path)
    loaded = load_model(path, trust_pickle=True)
    assert marker.exists()
    assert loaded.kind == "exported_program" and torch.equal(loaded.example_inputs[0], programs.inputs[0])


def test_refusal_holds_when_torch_is_told_to_skip_weights_only(programs, tmp_path, monkeypatch):
    """TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD turns torch.load's default off; the explicit check stays on."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    path, marker = craft("sample_inputs", programs, tmp_path)
    assert f"references {SYSTEM}" in one_line_refusal(path)
    assert not marker.exists()


def test_program_is_loaded_from_the_bytes_that_were_checked(programs, tmp_path, monkeypatch):
    """No second read of the path: a file swapped after the check cannot be what torch loads."""
    path = tmp_path / "net.pt2"
    path.write_bytes(programs.plain)
    seen = []
    real_load = torch.export.load
    monkeypatch.setattr(torch.export, "load", lambda f, *a, **k: seen.append(f) or real_load(f, *a, **k))
    load_model(path)
    assert len(seen) == 1 and isinstance(seen[0], io.BytesIO), seen


# --- legitimate programs --------------------------------------------------------------------------------------------

def test_legit_program_loads_with_its_example_inputs(programs, tmp_path):
    path = tmp_path / "net.pt2"
    path.write_bytes(programs.plain)
    loaded = load_model(path)
    assert loaded.kind == "exported_program"
    assert len(loaded.example_inputs) == 1 and torch.equal(loaded.example_inputs[0], programs.inputs[0])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.module()(*programs.inputs), small_net()(*programs.inputs))


def test_legit_dynamic_program_passes_the_expression_and_guard_checks(programs, tmp_path):
    path = tmp_path / "add_one.pt2"
    path.write_bytes(programs.dynamic)
    loaded = load_model(path)
    assert loaded.model._guards_code, "nothing was checked"
    x, y = programs.dynamic_inputs
    torch.testing.assert_close(loaded.model.module()(x, y), x + y[1:])
    with pytest.raises(Exception, match="Guard failed"):  # the saved guard still guards
        loaded.model.module()(x, torch.randn(7, 3))


# --- the CLI --------------------------------------------------------------------------------------------------------

def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "repfx.trt", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT_S)


def explain(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"


@pytest.mark.parametrize("name", ["sample_inputs", "shape_expression"])
def test_cli_refuses_crafted_program_with_one_line_and_no_files(programs, tmp_path, name):
    path, marker = craft(name, programs, tmp_path)
    result = run_cli(str(path), "--out", "out", "--quiet", cwd=tmp_path)
    assert result.returncode == 2, explain(result)
    assert len(result.stderr.splitlines()) == 1, explain(result)
    assert result.stderr.startswith("repfx.trt: error: ") and "--trust-pickle" in result.stderr, explain(result)
    assert not marker.exists(), "the payload ran"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name]), "files were written"


# --- telling archives apart -----------------------------------------------------------------------------------------

def synthetic_zip(*names: str, archive_format: bytes = b"pt2") -> bytes:
    return build_zip("", {name: archive_format if name.endswith("archive_format") else b"" for name in names})


SNIFF_CASES = {
    "torchscript_with_models_and_code_paths": (synthetic_zip(
        "m/data.pkl", "m/constants.pkl", "m/code/__torch__/timm/models/byobnet.py", "m/version"), "torchscript"),
    "torchscript_of_a_models_package": (synthetic_zip(
        "m/data.pkl", "m/constants.pkl", "m/code/__torch__/torchvision/models/resnet.py",
        "m/models/weights.txt"), "torchscript"),
    "pt2": (synthetic_zip("p/archive_format", "p/models/model.json", "p/data/sample_inputs/model.pt"),
            "exported_program"),
    "pt2_marker_with_other_content": (synthetic_zip("p/archive_format", "p/models/model.json",
                                                    archive_format=b"zip"), "unknown"),
    "pt2_marker_below_the_root": (synthetic_zip("p/extra/archive_format", "p/models/model.json"), "unknown"),
    "torch_save_zip": (synthetic_zip("archive/data.pkl", "archive/data/0", "archive/version"), "pickle"),
    "torch_save_zip_with_models_and_code_folders": (synthetic_zip(
        "archive/data.pkl", "archive/models/x", "archive/code/y"), "pickle"),
    "constants_pkl_below_the_root": (synthetic_zip("m/data.pkl", "m/sub/constants.pkl", "m/code/a.py"), "pickle"),
    "members_outside_one_prefix": (synthetic_zip("m/constants.pkl", "m/code/a.py", "other/data.pkl"), "unknown"),
    "zip_without_prefix_folder": (synthetic_zip("data.pkl", "constants.pkl"), "unknown"),
    "legacy_pickle": (pickle.dumps({"a": 1}, protocol=2), "pickle"),
    "random_bytes": (b"\x00not a model" * 10, "unknown"),
    "empty": (b"", "unknown"),
}


@pytest.mark.parametrize("case", list(SNIFF_CASES))
def test_sniff_goes_by_the_formats_markers(case):
    data, kind = SNIFF_CASES[case]
    assert sniff_kind(data) == kind


def test_sniff_real_archives(programs):
    with torch.no_grad():
        scripted = io.BytesIO()
        torch.jit.save(torch.jit.trace(small_net(), programs.inputs), scripted)
    assert sniff_kind(scripted.getvalue()) == "torchscript"
    assert sniff_kind(programs.plain) == "exported_program"
    assert sniff_kind(torch_saved(small_net())) == "pickle"
    assert sniff_kind(torch_saved({"w": torch.ones(2)})) == "pickle"


# --- TorchScript of timm and torchvision models ---------------------------------------------------------------------

def timm_repvgg() -> nn.Module:
    timm = pytest.importorskip("timm", reason="timm is a test extra")
    return timm.create_model("repvgg_a0", pretrained=False)


def torchvision_resnet() -> nn.Module:
    torchvision = pytest.importorskip("torchvision", reason="torchvision is a test extra")
    return torchvision.models.resnet18(weights=None)


TORCHSCRIPT_MODELS = {"timm_repvgg_a0": timm_repvgg, "torchvision_resnet18": torchvision_resnet}
ZOO = [pytest.param("timm_repvgg_a0", marks=pytest.mark.timm), "torchvision_resnet18"]


@pytest.fixture(scope="module")
def torchscript_file(tmp_path_factory) -> Callable[[str], Path]:
    """``torchscript_file(name)``: the model traced at TS_SHAPE and torch.jit.save'd (once per module)."""
    folder, files = tmp_path_factory.mktemp("torchscript"), {}

    def build(name: str) -> Path:
        if name not in files:
            torch.manual_seed(0)
            model = TORCHSCRIPT_MODELS[name]().eval()
            with torch.no_grad():
                torch.jit.save(torch.jit.trace(model, torch.randn(TS_SHAPE)), folder / f"{name}.ts")
            files[name] = folder / f"{name}.ts"
        return files[name]
    return build


@pytest.mark.parametrize("name", ZOO)
def test_torchscript_of_model_zoo_is_torchscript(torchscript_file, name):
    data = torchscript_file(name).read_bytes()
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert any("/models/" in member for member in archive.namelist()), "the case the old sniffing got wrong"
    assert sniff_kind(data) == "torchscript"
    loaded = load_model(torchscript_file(name))
    assert loaded.kind == "torchscript" and isinstance(loaded.model, torch.jit.ScriptModule)


@pytest.mark.parametrize("name", [pytest.param("timm_repvgg_a0", marks=[pytest.mark.timm, pytest.mark.slow]),  # 27-52 s
                                  "torchvision_resnet18"])  # 17-32 s
def test_cli_deploys_torchscript_of_model_zoo_with_triton_entry(torchscript_file, tmp_path, name):
    shape = "x".join(map(str, TS_SHAPE))
    result = run_cli(str(torchscript_file(name)), "--input-shape", shape, "--out", "out", "--name", "net",
                     "--triton-repo", "triton", "--quiet", cwd=tmp_path)
    assert result.returncode == 0, explain(result)
    assert (tmp_path / "out" / "net.onnx").is_file(), explain(result)
    configs = list((tmp_path / "triton").glob("*/config.pbtxt"))
    assert len(configs) == 1, configs
    config = text_format.Parse(configs[0].read_text(), model_config_pb2.ModelConfig())
    assert config.name == "net" and config.platform == "onnxruntime_onnx"
    assert [list(tensor.dims) for tensor in config.input] == [list(TS_SHAPE)]
    assert [list(tensor.dims) for tensor in config.output] == [[1, 1000]]


class _ScriptOnly(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_a_trusted_pickle_of_a_class_from_the_saving_script_says_so_in_one_line(tmp_path, monkeypatch):
    """``torch.save(model)`` in a script names the class ``__main__.X``; loaded elsewhere, pickle said only
    "Can't get attribute 'X'"."""
    monkeypatch.setattr(_ScriptOnly, "__module__", "__main__")
    monkeypatch.setattr(sys.modules["__main__"], "_ScriptOnly", _ScriptOnly, raising=False)
    torch.save(_ScriptOnly(), tmp_path / "m.pt")
    monkeypatch.delattr(sys.modules["__main__"], "_ScriptOnly")
    with pytest.raises(BadInput, match=r"class _ScriptOnly, defined in the script that saved it \(__main__\), "
                                       r"which cannot be imported here; save the model with torch.export.save"):
        load_model(tmp_path / "m.pt", trust_pickle=True)
