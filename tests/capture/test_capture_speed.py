"""Lean capture (``repfx.capture.lean``): the same graph as torch.export's default, torch's switches restored.

Capture turns off two things torch.export does for nobody here (node stack traces, code
regenerated after each of its passes). What must hold: the graph is the one the default
capture gives, node for node, for every kind of model capture takes (a plain module, one
with in-place ops that is functionalized, one writing a buffer, a dynamic batch,
TorchScript, an ExportedProgram); torch's process-wide switches are back
as they were afterwards, also when capture fails, and whatever they were before; the
user's model is not touched; and a failing capture names the same line. Timing is
bench/reparam_speed.py's job, not these tests'.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx._lazy_graph_module as lazy_graph_module
from torch import nn

from helpers import assert_matches, build, rand
from repfx import samples
from repfx.capture import lean
from repfx.capture.export import capture
from repfx.errors import CaptureError


class AddsInPlace(nn.Module):
    """``out += x``: an in-place op, so capture functionalizes the program (a second trace)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x):
        out = self.bn(self.conv(x))
        out += x
        return out.relu_()


class CountsSteps(nn.Module):
    """Writes a buffer as it runs: the captured graph keeps doing so."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.step += 1
        return self.conv(x) + self.step


class BranchesOnValues(nn.Module):
    """Data-dependent control flow: torch.export cannot capture it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:  # the line the error names
            return y
        return -y


SEEN: list[tuple[bool, bool]] = []  # outside the model: capture traces a copy of it


class SeesSwitches(nn.Module):
    """Records, while torch.export runs its forward (non-strict: real Python), what the switches are."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        SEEN.append((torch.fx.config.do_not_emit_stack_traces, lazy_graph_module._use_lazy_graph_module_flag))
        return self.conv(x)


def _torchscript() -> torch.jit.ScriptModule:
    return torch.jit.trace(build(lambda: samples.build_sample("repvgg_block")), rand(2, 32, 8, 8))


def _program() -> torch.export.ExportedProgram:
    """The user's own program: capture unlifts a copy of it."""
    return torch.export.export(build(lambda: samples.build_sample("mobileone_block")), (rand(2, 32, 8, 8),))


CASES = {  # name: (model factory, example input shape, dynamic_batch)
    "repvgg_block": (lambda: build(lambda: samples.build_sample("repvgg_block")), (2, 32, 8, 8), False),
    "mobileone_block": (lambda: build(lambda: samples.build_sample("mobileone_block")), (2, 32, 8, 8), False),
    "dbb_block (slice assignments)": (lambda: build(lambda: samples.build_sample("dbb_block")), (2, 16, 8, 8), False),
    "in-place add": (lambda: build(AddsInPlace), (2, 8, 8, 8), False),
    "buffer written": (lambda: build(CountsSteps), (2, 8, 8, 8), False),
    "repvgg_block dynamic batch": (lambda: build(lambda: samples.build_sample("repvgg_block")), (2, 32, 8, 8), True),
    "TorchScript": (_torchscript, (2, 32, 8, 8), False),
    "ExportedProgram": (_program, (2, 32, 8, 8), False),
}


def _structure(gm: torch.fx.GraphModule) -> list[tuple]:
    """Each node's name, op, target, arguments and value shape: what the passes read."""
    def shape(node):
        value = node.meta.get("val")
        return (str(tuple(value.shape)), value.dtype) if isinstance(value, torch.Tensor) else repr(value)
    return [(n.name, n.op, str(n.target), str(n.args), str(n.kwargs), shape(n)) for n in gm.graph.nodes]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_lean_capture_gives_the_default_graph(case):
    factory, shape, dynamic_batch = CASES[case]
    model, x = factory(), rand(*shape)
    with lean._as_torch_default():
        default = capture(model, (x,), dynamic_batch=dynamic_batch)
    captured = capture(model, (x,), dynamic_batch=dynamic_batch)
    assert _structure(captured.graph) == _structure(default.graph)
    assert captured.graph.code == default.graph.code
    assert captured.buffers_written == default.buffers_written
    traced = not isinstance(model, torch.export.ExportedProgram)  # a program given keeps its own stack traces
    assert not traced or not any("stack_trace" in node.meta for node in captured.graph.graph.nodes)


def test_default_capture_records_stack_traces():
    """The benchmark's "before" is torch's default (else its numbers would compare lean with lean)."""
    with lean._as_torch_default():
        gm = capture(build(AddsInPlace), (rand(2, 8, 8, 8),)).graph
    assert any(node.meta.get("stack_trace") for node in gm.graph.nodes)
    assert lean._enabled


def test_repfx_traceback_keeps_stack_traces(monkeypatch):
    monkeypatch.setenv("REPFX_TRACEBACK", "1")
    gm = capture(build(AddsInPlace), (rand(2, 8, 8, 8),)).graph
    assert any(node.meta.get("stack_trace") for node in gm.graph.nodes)


def test_the_captured_graph_is_a_plain_graph_module_that_runs():
    model, x = build(AddsInPlace), rand(2, 8, 8, 8)
    gm = capture(model, (x,)).graph
    assert not isinstance(gm, lazy_graph_module._LazyGraphModule)
    assert "def forward" in gm.code
    assert_matches(model, gm, (x,))


def test_switches_are_on_during_the_trace_only():
    SEEN.clear()
    capture(build(SeesSwitches), (rand(2, 8, 8, 8),))
    assert SEEN == [(True, True)]
    assert (torch.fx.config.do_not_emit_stack_traces, lazy_graph_module._use_lazy_graph_module_flag) == (False, False)


@pytest.mark.parametrize("before", [False, True], ids=["stack traces on", "stack traces off"])
@pytest.mark.parametrize("model", [AddsInPlace, BranchesOnValues], ids=["captured", "capture fails"])
def test_torch_switches_are_restored_as_they_were(monkeypatch, before, model):
    monkeypatch.setattr(torch.fx.config, "do_not_emit_stack_traces", before)
    try:
        capture(build(model), (rand(2, 8, 8, 8),))
    except CaptureError:
        assert model is BranchesOnValues
    assert torch.fx.config.do_not_emit_stack_traces is before
    assert lazy_graph_module._use_lazy_graph_module_flag is False


def test_a_failing_capture_names_the_same_line():
    model, x = build(BranchesOnValues), rand(2, 8, 8, 8)
    with pytest.raises(CaptureError) as lean_error:
        capture(model, (x,))
    with lean._as_torch_default(), pytest.raises(CaptureError) as default_error:
        capture(model, (x,))
    assert "if y.sum() > 0:" in str(lean_error.value).splitlines()[0]
    assert str(lean_error.value) == str(default_error.value)


def test_the_benchmark_switch_is_restored_when_its_block_raises():
    with pytest.raises(RuntimeError), lean._as_torch_default():
        raise RuntimeError("inside")
    assert lean._enabled


def test_the_model_as_given_is_untouched():
    model, x = build(CountsSteps, train=True), rand(2, 8, 8, 8)
    state = copy.deepcopy(model.state_dict())
    tensors = {name: tensor for name, tensor in model.state_dict(keep_vars=True).items()}
    with pytest.warns(UserWarning, match="training mode"):
        captured = capture(model, (x,))
    assert model.training and all(module.training for module in model.modules())
    assert model.state_dict(keep_vars=True).keys() == tensors.keys()
    for name, tensor in model.state_dict(keep_vars=True).items():
        assert tensor is tensors[name] and torch.equal(tensor, state[name]), name
    shared = {t.data_ptr() for t in tensors.values()} & {t.data_ptr() for t in captured.graph.state_dict().values()}
    assert not shared, "the captured graph shares the user's tensors"
