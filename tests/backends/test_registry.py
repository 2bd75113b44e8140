"""The backend interface and registry, proven with a backend that exists only in this file.

``Float64Backend`` ("toy") is all that adding a backend takes: a ``Backend`` with a
name and ``build``, here also a refused precision, a report note, an artifact for
``repfx.export``, a runtime of its own (what ``cost="measure"`` times forms with),
a place in "auto" and whether it runs modules. It is registered for one test and
unregistered after, and goes through ``repfx.compile``, ``repfx.export``,
``cost="measure"`` and ``python -m repfx.trt`` without any other file knowing it.
Also: how an unknown name is refused, today's texts of ``supports()`` refusals, the
"auto" rule, and the precision table driving every tolerance.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import get_args

import pytest
import torch

import repfx
from repfx.backends import (BACKENDS, Artifact, ArtifactJob, Backend, BuildRequest, Check, Runtime, Unsupported,
                            names, register, resolve_backend, unregister)
from repfx.backends.formats import export_formats, resolve_formats
from repfx.backends.precision import PRECISIONS, PrecisionName, cast_floating
from repfx.cli import trt as cli
from repfx.deploy.export import FORMATS
from repfx.samples import build_sample, randomize_bn_

from deploy_fixtures import TENSORRT
from helpers import DepthwiseBesideDense, assert_matches, build, rand


class Float64Runner:
    """Runs a graph in float64 and answers in the dtype it was fed; ``error`` adds error * max(1, max|y|)."""

    def __init__(self, module: torch.nn.Module, error: float) -> None:
        self.module, self.error = copy.deepcopy(module).double(), error

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.module(x.double())
        return (out + self.error * max(1.0, out.abs().max().item())).to(x.dtype)


class Float64Backend(Backend):
    name = "toy"

    def __init__(self, error: float = 0.0) -> None:
        self.error, self.built, self.timed_forms = error, 0, 0
        self.artifacts = (Artifact("toy", "the toy program", {"toy": "{name}.f64.pt2"}, self.write),)
        self.runtime = Runtime("toy runtime", timed=self.timed)

    def timed(self, module: torch.nn.Module, inputs: tuple):
        """How cost="measure" runs a form with this backend: in float64, as it runs everything."""
        self.timed_forms += 1
        module = copy.deepcopy(module).double()
        return lambda *args: module(*(arg.double() for arg in args))

    def supports(self, precision: str) -> Unsupported | None:
        return Unsupported("the toy runtime has no bfloat16 kernels", instead="fp32") if precision == "bf16" else None

    def build(self, request: BuildRequest) -> Float64Runner:
        self.built += 1
        return Float64Runner(request.graph, self.error)

    def annotate(self, program: torch.export.ExportedProgram, report: repfx.Report) -> None:
        report.notes.append(f"toy: {len(program.graph.nodes)} nodes")

    def write(self, job: ArtifactJob) -> Check:
        program = torch.export.export(copy.deepcopy(job.graph).double(), cast_floating(job.inputs, torch.float64))
        with job.out.writing("toy") as path:
            torch.export.save(program, path)
        return Check("the toy program", "toy runtime",
                     lambda: Float64Runner(torch.export.load(path).module(), self.error))


@pytest.fixture
def toy():
    backend = register(Float64Backend())
    yield backend
    unregister("toy")


# --- registering a backend --------------------------------------------------------------------------------------

def test_a_registered_backend_is_built_by_compile_and_verified(toy, net, x):
    deployed = repfx.compile(net, (x,), backend="toy")
    assert toy.built == 1 and isinstance(deployed.runner, Float64Runner)
    assert deployed.backend == deployed.report.backend == "toy"
    assert deployed.report.backend_max_abs_error <= deployed.report.backend_tolerance
    assert_matches(net, deployed, x)


def test_a_registered_artifact_is_written_and_checked_by_export(toy, net, x, tmp_path):
    assert "toy" in export_formats() and "toy" in resolve_formats(None, "fp32")[0]
    result = repfx.export(net, (x,), tmp_path, formats=("pt2", "toy"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.f64.pt2", "model.pt2", "model.report.json"]
    assert result.report.backend == "toy runtime"
    assert result.report.backend_max_abs_error <= result.report.backend_tolerance
    assert any(note.startswith("toy: ") for note in result.report.notes), "export asks every backend to annotate"
    assert_matches(copy.deepcopy(net).double(), torch.export.load(str(result.files["toy"])).module(), x.double())


def test_a_mismatching_artifact_fails_the_export_and_nothing_is_written(toy, net, x, tmp_path):
    toy.error = 1e-3  # ten times fp32's rtol
    with pytest.raises(repfx.VerificationError, match="the toy program does not match the plain graph in toy runtime"):
        repfx.export(net, (x,), tmp_path, formats=("pt2", "toy"))
    assert list(tmp_path.iterdir()) == []


def test_an_unregistered_backend_is_gone(net, x):
    register(Float64Backend())
    unregister("toy")
    assert "toy" not in names() and "toy" not in export_formats()
    with pytest.raises(ValueError, match="backend must be one of"):
        repfx.compile(net, (x,), backend="toy")


@pytest.mark.parametrize("name", ["toy", "onnx", "auto"])
def test_register_refuses_a_name_in_use(toy, name):
    with pytest.raises(ValueError, match="already registered"):
        register(type("Named", (Float64Backend,), {"name": name})())


def test_the_builtin_backends_are_the_modules_that_define_one():
    assert names() == ("eager", "inductor", "onnx", "tensorrt")
    assert BACKENDS == ("auto", *names())
    assert FORMATS == export_formats() == ("pt2", "onnx", "engine")


def test_an_unknown_backend_name_lists_the_registered_ones(toy, net, x):
    with pytest.raises(ValueError) as refused:
        repfx.compile(net, (x,), backend="tvm")
    assert str(refused.value) == "backend must be one of auto, eager, inductor, onnx, tensorrt, toy, got 'tvm'"


class DecidesOnAValue(torch.nn.Module):
    """Cannot be captured whole (``.item()`` decides); the ACNet inside it can, so it is folded in parts."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        y = self.net(x)
        return y / 2 if y.abs().mean().item() > 1e6 else y


def test_a_backend_that_runs_modules_takes_a_model_folded_in_parts(toy, net, x):
    model = DecidesOnAValue(net).eval()
    with pytest.raises(repfx.CaptureError, match="cannot be exported as one graph"):
        repfx.compile(model, (x,), backend="toy")  # by default a backend lowers one graph
    toy.runs_modules = True
    with pytest.warns(UserWarning, match="folded it in parts"):
        deployed = repfx.compile(model, (x,), backend="toy")
    assert deployed.backend == "toy" and deployed.report.parts and toy.built == 1
    assert_matches(model, deployed, x)


def test_cost_measure_times_forms_with_the_backends_runtime(toy):
    """A contested merge (a depthwise 3x3 beside a dense 1x1) is timed the way the backend runs: compile plans
    with its backend's runtime, export with that of the artifacts it writes."""
    model, x = build(lambda: DepthwiseBesideDense(8)), rand(1, 8, 8, 8)
    deployed = repfx.compile(model, (x,), backend="toy", cost="measure")
    assert toy.timed_forms == 2 and [d["how"] for d in deployed.report.decisions] == ["measured"]
    assert_matches(model, deployed, x)
    repfx.explain(model, (x,), cost="measure")
    assert toy.timed_forms == 2, "eager PyTorch times its own forms"


def test_cost_measure_in_an_export_times_with_the_written_artifacts_runtime(toy, tmp_path):
    model, x = build(lambda: DepthwiseBesideDense(8)), rand(1, 8, 8, 8)
    result = repfx.export(model, (x,), tmp_path, formats=("toy",), cost="measure")
    assert toy.timed_forms == 2 and [d["how"] for d in result.report.decisions] == ["measured"]


def test_auto_takes_the_usable_backend_of_highest_rank(toy, net, x):
    toy.auto_rank = 100
    assert resolve_backend("auto")[0] == "toy"
    assert repfx.compile(net, (x,)).backend == "toy" and toy.built == 1


def test_the_cli_writes_measures_and_benchmarks_a_registered_backend(toy, tmp_path, capsys):
    """``python -m repfx.trt`` takes the backend's format, plans for its runtime and times its artifact."""
    model, x = build(lambda: DepthwiseBesideDense(8)), rand(1, 8, 8, 8)
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "block.pt2")
    code = cli.main([str(tmp_path / "block.pt2"), "--formats", "pt2,toy", "--out", str(tmp_path / "out"),
                     "--cost", "measure", "--benchmark", "--quiet"])
    out = capsys.readouterr().out
    assert code == cli.EXIT_OK
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["block.f64.pt2", "block.pt2", "block.report.json"]
    assert toy.timed_forms == 2 and "measured on" in out
    table = out.split("speed-up within the runtime):\n")[1].split("\n\n")[0].splitlines()
    assert [line.split()[:2] for line in table if line.split()[0] == "toy"] == [["toy", "as"], ["toy", "repfx"]]


# --- supports(): today's refusal texts, from the one rule ------------------------------------------------------

def test_compile_refuses_bf16_on_onnx_before_any_work(net, x):
    with pytest.raises(ValueError) as refused:
        repfx.compile(net, (x,), backend="onnx", precision="bf16")
    assert str(refused.value) == ("the onnx backend cannot run bf16: onnxruntime has no bfloat16 Conv kernel; "
                                  "use precision='fp16'")


def test_export_refuses_a_named_bf16_onnx_before_writing(net, x, tmp_path):
    with pytest.raises(ValueError) as refused:
        repfx.export(net, (x,), tmp_path / "out", formats=("pt2", "onnx"), precision="bf16")
    assert str(refused.value) == ("ONNX at bf16 cannot be checked: onnxruntime has no bfloat16 Conv kernel; "
                                  "use precision fp16 for ONNX, or bf16 for the TensorRT engine")
    assert not (tmp_path / "out").exists()


def test_export_skips_bf16_onnx_by_default_and_says_why():
    wanted, skipped = resolve_formats(None, "bf16")
    assert "onnx" not in wanted
    assert skipped["onnx"] == ("onnxruntime has no bfloat16 Conv kernel to check it with; "
                               "use --precision fp16 for ONNX, or bf16 for the TensorRT engine")


def test_a_registered_backends_refusal_reads_the_same(toy, net, x):
    with pytest.raises(ValueError) as refused:
        repfx.compile(net, (x,), backend="toy", precision="bf16")
    assert str(refused.value) == ("the toy backend cannot run bf16: the toy runtime has no bfloat16 kernels; "
                                  "use precision='fp32'")
    assert resolve_formats(None, "bf16")[1]["toy"] == (
        "the toy runtime has no bfloat16 kernels to check it with; "
        "use --precision fp32 for the toy program, or bf16 for the TensorRT engine")


# --- "auto" -------------------------------------------------------------------------------------------------------

def test_auto_falls_back_to_inductor_and_logs_why(caplog):
    if TENSORRT.usable:
        pytest.skip("TensorRT is usable here: auto picks it")
    name, reason = resolve_backend("auto")
    assert name == "inductor" and "torch_tensorrt" in reason
    block = randomize_bn_(build_sample("repvgg_block"), 0).eval()
    with caplog.at_level(logging.INFO, logger="repfx"):
        deployed = repfx.compile(block, (rand(1, 32, 8, 8),))
    assert deployed.backend == "inductor"
    lines = [r.getMessage() for r in caplog.records if r.name == "repfx"]
    assert len(lines) == 1 and "inductor" in lines[0] and "TensorRT unavailable" in lines[0]


# --- the precision table ----------------------------------------------------------------------------------------

def test_the_precision_table_is_what_the_signatures_accept():
    assert get_args(PrecisionName) == tuple(PRECISIONS) == ("fp32", "fp16", "bf16", "int8")
    assert [entry.dtype for entry in PRECISIONS.values()] == [torch.float32, torch.float16, torch.bfloat16,
                                                               torch.float32]
    assert PRECISIONS["fp32"].rtol < PRECISIONS["fp16"].rtol < PRECISIONS["bf16"].rtol
    # INT8 is no cast: the graph stays fp32 and is judged on held-out data; its files say int8 in their names.
    assert [name for name, entry in PRECISIONS.items() if entry.quantized] == ["int8"]
    assert PRECISIONS["int8"].suffix == ".int8"


def test_the_precision_table_sets_the_tolerance_of_compile_and_export(toy, net, x, tmp_path, monkeypatch):
    before = repfx.compile(net, (x,), backend="toy").report.backend_tolerance
    monkeypatch.setitem(PRECISIONS, "fp32", dataclasses.replace(PRECISIONS["fp32"], rtol=1e-2))
    after = repfx.compile(net, (x,), backend="toy").report.backend_tolerance
    assert after == pytest.approx(before * 100), "same worst case, rtol 1e-4 -> 1e-2"

    toy.error = 1e-3  # beyond fp32's 1e-4, within the patched 1e-2
    assert repfx.compile(net, (x,), backend="toy").report.backend_max_abs_error > 0
    result = repfx.export(net, (x,), tmp_path, formats=("toy",))
    assert result.report.backend_max_abs_error <= result.report.backend_tolerance
