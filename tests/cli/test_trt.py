"""``python -m repfx.trt``: the command line, run as a user runs it (a subprocess), on tiny models.

TensorRT is not installable on the CI machines, so the engine is never built here:
what is checked is everything the command does without it (the .pt2, the .onnx,
<name>.report.json, the Triton entry), what it says about the missing engine, and how it
fails. Every model is a small training-form net built in this file with randomized
BatchNorm, saved the three ways a user hands it over (torch.jit.save,
torch.export.save, torch.save), so every written file can be checked against the
eager original.

Each CLI invocation takes seconds (mostly importing torch), so the invocations the
selected tests need are started together when the module's first test runs, a few
at a time, and each test waits for its own (``cli(case)``).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch
from google.protobuf import text_format
from torch import nn
from tritonclient.grpc import model_config_pb2

# The subprocess runs outside the checkout, where `samples` is importable only as
# `repfx.samples`: the pickled model must name its classes by that module path.
from repfx.samples import RepVGGBlock

from helpers import DataDependent, TwoInputs, build, max_error, rand

BLOCKS = 2  # RepVGGBlock 3->8 stride 2 (3x3 + 1x1) and 8->8 (3x3 + 1x1 + identity BN): one conv each
BATCH_NORMS = 5  # 2 + 3 branches
SHAPE = (1, 3, 32, 32)
OUT_SHAPE = (1, 8, 16, 16)
MLP_SHAPE = (2, 3, 4, 4)
FP16_RTOL = 1e-2
WORKERS = max(2, os.cpu_count() or 1)
TIMEOUT_S = 300


def repvgg_net() -> nn.Module:
    return nn.Sequential(RepVGGBlock(3, 8, stride=2), RepVGGBlock(8, 8))


def mlp() -> nn.Module:
    """Linear -> ReLU -> Linear: the nonlinearity sits between the linears, so nothing can merge."""
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.ReLU(), nn.Linear(16, 5))


# --- the model files ----------------------------------------------------------------------------------------------

@dataclass
class Models:
    net: nn.Module
    mlp: nn.Module
    files: dict[str, Path]  # placeholder name -> file


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Models:
    folder = tmp_path_factory.mktemp("models")
    net, small_mlp, data_dependent = build(repvgg_net), build(mlp), build(DataDependent)
    x = rand(*SHAPE)
    files = {name: folder / filename for name, filename in [
        ("net_ts", "net_ts.pt"), ("net_pt2", "net.pt2"), ("net_pickle", "net_pickle.pt"),
        ("net_dynamic_pt2", "net_dynamic.pt2"), ("mlp_pt2", "mlp.pt2"), ("data_dependent_ts", "dd_ts.pt"),
        ("random_bytes", "random.bin"), ("truncated_pt2", "truncated.pt2"), ("onnx_file", "net.onnx"),
        ("two_inputs_ts", "two_inputs_ts.pt")]}
    with torch.no_grad():
        torch.jit.save(torch.jit.trace(net, x), files["net_ts"])
        torch.export.save(torch.export.export(net, (x,)), files["net_pt2"])
        torch.save(net, files["net_pickle"])
        # Exported with a batch range of its own (1..64), as a user who wants dynamic batch would.
        batch = torch.export.Dim("batch", max=64)
        torch.export.save(torch.export.export(net, (rand(2, *SHAPE[1:]),), dynamic_shapes=({0: batch},)),
                          files["net_dynamic_pt2"])
        torch.export.save(torch.export.export(small_mlp, (rand(*MLP_SHAPE),)), files["mlp_pt2"])
        torch.jit.save(torch.jit.script(data_dependent), files["data_dependent_ts"])
        torch.jit.save(torch.jit.trace(build(TwoInputs), (x, rand(1, 4, *SHAPE[2:]))), files["two_inputs_ts"])
    files["random_bytes"].write_bytes(b"\x00" + random.Random(0).randbytes(4096))
    files["truncated_pt2"].write_bytes(files["net_pt2"].read_bytes()[:4096])  # an interrupted copy
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(small_mlp, (rand(*MLP_SHAPE),), str(files["onnx_file"]), dynamo=True, verbose=False)
    files["models_dir"] = folder
    return Models(net, small_mlp, files)


# --- the CLI invocations --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Run:
    """``python -m repfx.trt ARGS`` in a fresh directory; ``{name}`` in ARGS is a file of ``Models.files``."""

    args: tuple[str, ...]
    copy: tuple[str, ...] = ()  # model files copied into the run's directory first (given by file name)


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str
    cwd: Path
    copied: frozenset[str]

    @property
    def out(self) -> Path:
        return self.cwd / "out"

    def explain(self) -> str:
        return f"exit {self.returncode}\n--- stdout\n{self.stdout[-3000:]}\n--- stderr\n{self.stderr[-3000:]}"


def _run(args: str, copy: tuple[str, ...] = ()) -> Run:
    return Run(tuple(args.split()), copy)


RUNS: dict[str, Run] = {
    # succeed
    "torchscript": _run("{net_ts} --input-shape 1x3x32x32 --out out --name net --triton-repo triton --quiet"),
    "exported_program": _run("{net_pt2} --out out --name net --report json"),  # progress on: stdout is JSON
    "trusted_pickle": _run("{net_pickle} --trust-pickle --input-shape 1x3x32x32 --out out --name net --quiet"),
    "no_convolutions": _run("{mlp_pt2} --out out --report json --quiet"),  # default name: the file's stem
    "fp16": _run("{net_pt2} --precision fp16 --out out --name net --quiet"),
    "sample": _run("--sample repvgg_block --formats pt2 --no-verify --out out --quiet"),
    "dynamic_batch_pickle": _run("{net_pickle} --trust-pickle --input-shape 1x3x32x32 --dynamic-batch 1:4:8 "
                                 "--out out --name net --triton-repo triton --quiet"),
    "dynamic_batch_torchscript": _run("{net_ts} --input-shape 1x3x32x32 --dynamic-batch 1:4:8 "
                                      "--out out --name net --triton-repo triton --quiet"),
    "dynamic_batch_exported_program": _run("{net_dynamic_pt2} --dynamic-batch 1:4:8 "
                                           "--out out --name net --triton-repo triton --quiet"),
    # fail
    "torchscript_without_input_shape": _run("{net_ts} --out out --quiet"),
    "pickle_without_trust": _run("{net_pickle} --input-shape 1x3x32x32 --out out --quiet"),
    "missing_file": _run("missing.pt2 --out out --quiet"),
    "directory": _run("{models_dir} --out out --quiet"),
    "random_bytes": _run("{random_bytes} --out out --quiet"),
    "truncated_pt2": _run("{truncated_pt2} --out out --quiet"),
    "onnx_file": _run("{onnx_file} --out out --quiet"),
    "shape_not_a_number": _run("{net_ts} --input-shape 1x3xfoo --out out --quiet"),
    "shape_with_zero": _run("{net_ts} --input-shape 0x3x32x32 --out out --quiet"),
    "wrong_channels_torchscript": _run("{net_ts} --input-shape 1x5x32x32 --out out --quiet"),
    "wrong_channels_exported_program": _run("{net_pt2} --input-shape 1x5x32x32 --out out --quiet"),
    "wrong_rank_torchscript": _run("{net_ts} --input-shape 3x32x32 --out out --quiet"),
    "wrong_channels_dynamic_batch_pickle": _run("{net_pickle} --trust-pickle --input-shape 1x5x32x32 "
                                                "--dynamic-batch 1:2:4 --out out --quiet"),
    "two_inputs_torchscript_one_shape": _run("{two_inputs_ts} --input-shape 1x3x32x32 --out out --quiet"),
    "data_dependent_control_flow": _run("{data_dependent_ts} --input-shape 1x3x8x8 --out out --quiet"),
    "engine_requested": _run("{net_pt2} --formats engine --out out --quiet"),
    "engine_among_formats": _run("{net_pt2} --formats pt2,onnx,engine --out out --quiet"),
    "overwrites_input": _run("net.pt2 --out . --name net --quiet", copy=("net.pt2",)),
    "unsafe_triton_name": _run("{net_pt2} --name bad@name --out out --triton-repo triton --quiet"),
}


def _execute(run: Run, files: dict[str, Path], cwd: Path) -> Result:
    for filename in run.copy:
        shutil.copyfile(files["models_dir"] / filename, cwd / filename)
    args = [arg.format(**{name: str(path) for name, path in files.items()}) for arg in run.args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # runs share the cores: one thread each
    completed = subprocess.run([sys.executable, "-m", "repfx.trt", *args], cwd=cwd, env=env,
                               capture_output=True, text=True, timeout=TIMEOUT_S)
    return Result(completed.returncode, completed.stdout, completed.stderr, cwd, frozenset(run.copy))


def _case_of(item: pytest.Item) -> str | None:
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("case") if callspec is not None else None


@pytest.fixture(scope="module")
def cli(request, models, tmp_path_factory) -> Iterator[Callable[[str], Result]]:
    """``cli(case)`` is the finished run of ``RUNS[case]``; the runs of the selected tests start together."""
    selected = {_case_of(item) for item in request.session.items if getattr(item, "module", None) is request.module}
    selected.discard(None)
    pool = ThreadPoolExecutor(max_workers=WORKERS)
    futures: dict[str, Future] = {case: pool.submit(_execute, RUNS[case], models.files, tmp_path_factory.mktemp(case))
                                  for case in RUNS if case in selected}  # in the order the tests wait
    yield lambda case: futures[case].result()
    pool.shutdown(cancel_futures=True)


def cases(*names: str) -> list:
    """Parameters for the named runs of ``RUNS`` (``case=...``)."""
    return [pytest.param(name, id=name) for name in names]


# --- helpers --------------------------------------------------------------------------------------------------------

def leftovers(result: Result) -> list[str]:
    """Files and hidden entries (staging directories) under the run's directory, other than its copied inputs."""
    found = []
    for path in sorted(result.cwd.rglob("*")):
        relative = path.relative_to(result.cwd)
        if (path.is_file() and str(relative) not in result.copied) or path.name.startswith("."):
            found.append(str(relative))
    return found


def aten_op_counts(program: torch.export.ExportedProgram) -> Counter:
    return Counter(node.target.__name__ for node in program.graph.nodes if node.op == "call_function")


def convolutions(counts: Counter) -> int:
    return sum(n for name, n in counts.items() if name.startswith(("convolution", "conv2d")))


def onnx_op_counts(model: onnx.ModelProto) -> Counter:
    nodes = list(model.graph.node) + [node for function in model.functions for node in function.node]
    return Counter(node.op_type for node in nodes)


def run_onnx(path: Path, *inputs: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {value.name: tensor.numpy() for value, tensor in zip(session.get_inputs(), inputs)}
    return torch.from_numpy(session.run(None, feeds)[0])


def assert_close(expected: torch.Tensor, actual: torch.Tensor) -> None:
    error, allowed = max_error(expected, actual)
    assert error <= allowed, f"max|d| = {error:.3e} > {allowed:.3e}"


PROGRESS = re.compile(r"^(ok|x) +(?P<phase>\w+) +[\d.]+ s$")  # a finished phase, as PhaseProgress prints it


def triton_config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def onnx_dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [dim.dim_param or dim.dim_value for dim in value.type.tensor_type.shape.dim]


# --- end to end -----------------------------------------------------------------------------------------------------

END_TO_END = cases("torchscript", "exported_program", "trusted_pickle")


@pytest.mark.parametrize("case", END_TO_END)
def test_writes_pt2_onnx_and_report(cli, case):
    result = cli(case)
    assert result.returncode == 0, result.explain()
    assert sorted(path.name for path in result.out.iterdir()) == ["net.onnx", "net.pt2", "net.report.json"]
    assert not [name for name in leftovers(result) if Path(name).name.startswith(".")], leftovers(result)


@pytest.mark.parametrize("case", END_TO_END)
def test_written_pt2_has_one_conv_per_block_and_reproduces_the_model(cli, models, case):
    result = cli(case)
    assert result.returncode == 0, result.explain()
    program = torch.export.load(str(result.out / "net.pt2"))
    counts = aten_op_counts(program)
    assert convolutions(counts) == BLOCKS, counts
    assert not [name for name in counts if "batch_norm" in name], counts
    x = rand(*SHAPE, seed=3)
    with torch.no_grad():
        assert_close(models.net(x), program.module()(x))


@pytest.mark.parametrize("case", END_TO_END)
def test_written_onnx_has_one_conv_per_block_and_matches_in_onnxruntime(cli, models, case):
    result = cli(case)
    assert result.returncode == 0, result.explain()
    counts = onnx_op_counts(onnx.load(str(result.out / "net.onnx")))
    assert counts["Conv"] == BLOCKS, counts
    assert counts["BatchNormalization"] == 0, counts
    x = rand(*SHAPE, seed=3)
    with torch.no_grad():
        assert_close(models.net(x), run_onnx(result.out / "net.onnx", x))


@pytest.mark.parametrize("case", cases("exported_program"))
def test_json_report_is_the_only_stdout_and_counts_the_merges(cli, case):
    result = cli(case)
    assert result.returncode == 0, result.explain()
    payload = json.loads(result.stdout)  # progress went to stderr
    report = payload["report"]
    assert report["ops_before"]["convolution"] == 2 * BLOCKS and report["ops_before"]["batch_norm"] == BATCH_NORMS
    assert report["ops_after"]["convolution"] == BLOCKS and report["ops_after"]["batch_norm"] == 0
    assert len(report["rewrites"]) == BLOCKS and report["refusals"] == []
    assert report["max_abs_error"] <= report["tolerance"]
    assert report["backend"] == "onnxruntime" and report["backend_max_abs_error"] <= report["backend_tolerance"]
    assert sorted(payload["files"]) == ["onnx", "pt2", "report"]
    assert all((result.cwd / path).is_file() for path in payload["files"].values()), payload["files"]
    assert "TensorRT" in payload["skipped"]["engine"]
    written = json.loads((result.out / "net.report.json").read_text())
    record = {key: written.pop(key) for key in ("written_by", "repfx_version", "files")}  # what repfx wrote
    assert written == report
    assert record["written_by"] == "repfx" and sorted(record["files"]) == ["net.onnx", "net.pt2"]
    # Only the tensors with a range problem are listed (a method once tested for truth listed them all).
    assert len(payload["weight_range"]) < payload["weight_range_checked"]["tensors"]
    assert all(row["overflow"] or row["underflow"] for row in payload["weight_range"])


@pytest.mark.parametrize("case", cases("exported_program"))
def test_progress_shows_each_phase_on_stderr(cli, case):
    result = cli(case)
    assert result.returncode == 0, result.explain()
    finished = [PROGRESS.match(line)["phase"] for line in result.stderr.splitlines() if PROGRESS.match(line)]
    assert finished == ["load", "capture", "rewrite", "verify", "export"], result.stderr


@pytest.mark.parametrize("case", cases("torchscript"))
def test_table_report_says_once_why_no_engine_was_written(cli, case):
    result = cli(case)
    assert result.returncode == 0, result.explain()
    mentions = [line for line in result.stdout.splitlines() if "engine" in line.lower()]
    assert len(mentions) == 1, mentions
    assert "engine not written" in mentions[0] and "needs TensorRT" in mentions[0]
    assert "torch_tensorrt is not installed" in mentions[0]
    assert f"merged ({BLOCKS})" in result.stdout and "refused (0)" in result.stdout


@pytest.mark.parametrize("case", cases("torchscript", "trusted_pickle", "no_convolutions", "fp16", "sample"))
def test_quiet_hides_progress(cli, case):
    result = cli(case)
    assert result.returncode == 0, result.explain()
    assert not [line for line in result.stderr.splitlines() if PROGRESS.match(line)], result.stderr


# --- models that give nothing to merge, precision, samples ----------------------------------------------------------

@pytest.mark.parametrize("case", cases("no_convolutions"))
def test_model_without_convolutions_passes_through_unchanged(cli, models, case):
    result = cli(case)
    assert result.returncode == 0, result.explain()
    assert sorted(path.name for path in result.out.iterdir()) == ["mlp.onnx", "mlp.pt2", "mlp.report.json"]
    report = json.loads(result.stdout)["report"]
    assert report["rewrites"] == [] and report["ops_before"] == report["ops_after"]
    assert report["ops_after"]["convolution"] == 0
    assert report["parameters_before"] == report["parameters_after"] == sum(p.numel() for p in models.mlp.parameters())
    x = rand(*MLP_SHAPE, seed=3)
    with torch.no_grad():
        assert_close(models.mlp(x), run_onnx(result.out / "mlp.onnx", x))
        assert_close(models.mlp(x), torch.export.load(str(result.out / "mlp.pt2")).module()(x))


@pytest.mark.parametrize("case", cases("fp16"))
def test_fp16_onnx_is_half_precision_and_close_to_the_fp32_model(cli, models, case):
    result = cli(case)
    assert result.returncode == 0, result.explain()
    model = onnx.load(str(result.out / "net.onnx"))
    half = onnx.TensorProto.FLOAT16
    assert [value.type.tensor_type.elem_type for value in model.graph.input] == [half]
    assert [value.type.tensor_type.elem_type for value in model.graph.output] == [half]
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16, half}
    weights = {init.name: init.data_type for init in model.graph.initializer if init.data_type in float_types}
    assert weights and set(weights.values()) == {half}, weights
    x = rand(*SHAPE, seed=3)
    with torch.no_grad():
        expected = models.net(x)
    actual = run_onnx(result.out / "net.onnx", x.half())
    assert actual.dtype == torch.float16
    error = (expected.double() - actual.double()).abs().max().item()
    assert error <= FP16_RTOL * max(1.0, expected.abs().max().item()), error
    program = torch.export.load(str(result.out / "net.pt2"))
    assert {tensor.dtype for tensor in program.state_dict.values()} == {torch.float16}


@pytest.mark.parametrize("case", cases("sample"))
def test_sample_writes_only_the_requested_format(cli, case):
    result = cli(case)
    assert result.returncode == 0, result.explain()
    assert sorted(path.name for path in result.out.iterdir()) == ["repvgg_block.pt2", "repvgg_block.report.json"]
    counts = aten_op_counts(torch.export.load(str(result.out / "repvgg_block.pt2")))
    assert convolutions(counts) == 1 and not [name for name in counts if "batch_norm" in name], counts
    assert json.loads((result.out / "repvgg_block.report.json").read_text())["max_abs_error"] is None  # --no-verify


# --- Triton -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", cases("torchscript"))
def test_triton_entry_serves_the_onnx_model_at_its_fixed_shape(cli, case):
    result = cli(case)
    assert result.returncode == 0, result.explain()
    entry = result.cwd / "triton" / "net"
    assert sorted(str(path.relative_to(entry)) for path in entry.rglob("*")) == ["1", "1/model.onnx", "config.pbtxt"]
    assert (entry / "1" / "model.onnx").read_bytes() == (result.out / "net.onnx").read_bytes()
    config, model = triton_config(entry / "config.pbtxt"), onnx.load(str(entry / "1" / "model.onnx"))
    assert config.name == "net" and config.platform == "onnxruntime_onnx" and config.max_batch_size == 0
    assert [(t.name, list(t.dims)) for t in config.input] == [(v.name, onnx_dims(v)) for v in model.graph.input]
    assert [(t.name, list(t.dims)) for t in config.output] == [(v.name, onnx_dims(v)) for v in model.graph.output]
    assert [list(t.dims) for t in config.input] == [list(SHAPE)]
    assert [list(t.dims) for t in config.output] == [list(OUT_SHAPE)]
    assert {t.data_type for t in [*config.input, *config.output]} == {model_config_pb2.TYPE_FP32}


DYNAMIC_BATCH = cases("dynamic_batch_pickle", "dynamic_batch_torchscript", "dynamic_batch_exported_program")


@pytest.mark.parametrize("case", DYNAMIC_BATCH)
def test_triton_entry_and_onnx_take_any_batch_up_to_max(cli, models, case):
    result = cli(case)
    assert result.returncode == 0, result.explain()
    entry = result.cwd / "triton" / "net"
    config, model = triton_config(entry / "config.pbtxt"), onnx.load(str(entry / "1" / "model.onnx"))
    assert config.max_batch_size == 8 and config.HasField("dynamic_batching")
    assert [(t.name, list(t.dims)) for t in config.input] == [(v.name, onnx_dims(v)[1:]) for v in model.graph.input]
    assert [(t.name, list(t.dims)) for t in config.output] == [(v.name, onnx_dims(v)[1:]) for v in model.graph.output]
    assert [list(t.dims) for t in config.input] == [list(SHAPE[1:])]
    assert [list(t.dims) for t in config.output] == [list(OUT_SHAPE[1:])]
    batch = onnx_dims(model.graph.input[0])[0]
    assert isinstance(batch, str) and batch, f"batch dimension is fixed: {batch}"
    x = rand(3, *SHAPE[1:], seed=3)
    with torch.no_grad():
        assert_close(models.net(x), run_onnx(entry / "1" / "model.onnx", x))


# --- failures ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Failure:
    says: str | None  # a fragment the one-line message must contain (None: any one-line message)
    prefix: str = "repfx.trt: error: "
    code: int = 2


ARGPARSE = "python -m repfx.trt: error: argument --input-shape: "
FAILURES: dict[str, Failure] = {
    "torchscript_without_input_shape": Failure("--input-shape"),
    "pickle_without_trust": Failure("--trust-pickle"),
    "missing_file": Failure("no such file"),
    "directory": Failure("not a file"),
    "random_bytes": Failure("not a TorchScript archive"),
    "truncated_pt2": Failure("file cut short"),
    "onnx_file": Failure("an ONNX model; repfx folds PyTorch models"),
    "shape_not_a_number": Failure("expected a shape like 1x3x224x224", prefix=ARGPARSE),
    "shape_with_zero": Failure("positive integer", prefix=ARGPARSE),
    "wrong_channels_torchscript": Failure("channels"),
    "wrong_channels_exported_program": Failure(None),
    # the shape the model's first convolution reads, and the option that sets it (was "Invalid channel dimensions",
    # or torch's symbolic size "s35" with a dynamic batch)
    "wrong_rank_torchscript": Failure("reads 3 channels (Nx3xHxW): pass --input-shape 1x3x32x32"),
    "wrong_channels_dynamic_batch_pickle": Failure("reads 3 channels (Nx3xHxW): pass --input-shape 1x3x32x32"),
    "two_inputs_torchscript_one_shape": Failure("takes 2 inputs (image, mask), got 1: pass --input-shape once per "
                                                "input, in this order: image, mask"),
    "data_dependent_control_flow": Failure(None),
    "engine_requested": Failure("torch_tensorrt"),
    "engine_among_formats": Failure("torch_tensorrt"),
    "overwrites_input": Failure("it is the input model"),
    "unsafe_triton_name": Failure("not a safe directory name"),
}
FAILING = cases(*FAILURES)


@pytest.mark.parametrize("case", FAILING)
def test_failure_exit_code(cli, case):
    result = cli(case)
    assert result.returncode == FAILURES[case].code, result.explain()


@pytest.mark.parametrize("case", FAILING)
def test_failure_is_one_line_without_traceback(cli, case):
    result, failure = cli(case), FAILURES[case]
    assert "Traceback" not in result.stderr, result.explain()
    errors = [line for line in result.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and errors[0].startswith(failure.prefix), result.explain()
    assert failure.says is None or failure.says in errors[0], errors[0]
    if failure.prefix != ARGPARSE:  # --quiet: the error line is all there is
        assert result.stderr.splitlines() == errors


@pytest.mark.parametrize("case", FAILING)
def test_failure_names_no_symbolic_size(cli, case):
    result = cli(case)
    assert not re.search(r"(?<![\w.])s\d+(?![\w.])", result.stderr), result.explain()  # torch's s48, never the user's


@pytest.mark.parametrize("case", FAILING)
def test_failure_leaves_no_files(cli, case):
    result = cli(case)
    assert result.returncode != 0, result.explain()
    assert leftovers(result) == []
    assert not result.out.exists() or not any(result.out.iterdir())


@pytest.mark.parametrize("case", cases("overwrites_input"))
def test_input_file_is_never_overwritten(cli, models, case):
    result = cli(case)
    assert result.returncode == 2, result.explain()
    assert (result.cwd / "net.pt2").read_bytes() == models.files["net_pt2"].read_bytes()
    assert sorted(path.name for path in result.cwd.iterdir()) == ["net.pt2"]


def test_tolerance_flags_reach_every_check_and_the_headline_shows_the_tolerance_applied(tmp_path, capsys):
    from repfx.cli import demo, trt

    assert demo.main(["--sample", "repvgg_block", "--rtol", "1e-3", "--atol", "1e-6", "--strict"]) == 0
    assert "within tolerance (tolerance applied" in capsys.readouterr().out
    code = trt.main(["--sample", "repvgg_block", "--out", str(tmp_path / "out"), "--formats", "pt2,onnx",
                     "--rtol", "1e-3", "--strict", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0 and "within tolerance (tolerance applied" in out and "tolerance applied" in out.split("backend:")[1]


def test_quiet_silences_the_libraries_warnings_about_what_they_skip(tmp_path, monkeypatch, capsys):
    import logging

    from repfx.cli import trt

    real = trt.build_export

    def chatty(*args, **kwargs):
        logging.getLogger("onnxscript.optimizer").warning("Skipping constant folding for node 'x'")
        logging.getLogger("torch.onnx").warning("torchvision is not installed. Skipping torchvision::nms")
        return real(*args, **kwargs)

    monkeypatch.setattr(trt, "build_export", chatty)
    assert trt.main(["--sample", "repvgg_block", "--out", str(tmp_path / "out"), "--formats", "pt2", "--quiet"]) == 0
    assert "Skipping" not in capsys.readouterr().err
