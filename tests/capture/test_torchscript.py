"""A model given as TorchScript folds exactly as the same model given as a module or a .pt2.

``torch.jit.trace`` records numbers as 0-dim tensors and every dim of a slicing, and torch's
converter re-traces with symbolic sizes and TorchScript's debug names; capture undoes each
(``repfx.capture.torchscript``). Before, timm's mobileone_s0 kept 21 more convolutions and 50
adds as TorchScript, fastvit_t8 14 BatchNorms and 34 more adds, and the ONNX inputs were named
``x_1``. The families run at 64x64 on one thread (each well under 30 s, ghostnetv3_050 ~36 s).
"""

from __future__ import annotations

import io
import warnings
from collections import Counter
from collections.abc import Callable

import onnx
import pytest
import torch
from torch import nn

import repfx
from repfx.capture.export import capture


def timm_model(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        timm = pytest.importorskip("timm", reason="timm is a test extra")
        return timm.create_model(name, pretrained=False)
    return build


def torchvision_resnet18() -> nn.Module:
    torchvision = pytest.importorskip("torchvision", reason="torchvision is a test extra")
    return torchvision.models.resnet18(weights=None)


FAMILIES = {"repvgg_a0": timm_model("repvgg_a0"), "mobileone_s0": timm_model("mobileone_s0"),
            "fastvit_t8": timm_model("fastvit_t8"), "repvit_m0_9": timm_model("repvit_m0_9"),
            "ghostnetv3_050": timm_model("ghostnetv3_050"), "torchvision_resnet18": torchvision_resnet18}
SLOW = {"ghostnetv3_050"}  # its out[:, :c, :, :] slicings are the case for the slice chains


def saved_torchscript(model: nn.Module, inputs: tuple) -> torch.jit.ScriptModule:
    """Traced, saved and loaded, as a user hands it over (loading renames inputs ``x`` -> ``x.1``)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.jit is deprecated upstream; users still ship archives
        torch.jit.save(torch.jit.trace(model, inputs), buffer)
        buffer.seek(0)
        return torch.jit.load(buffer)


def saved_program(model: nn.Module, inputs: tuple) -> torch.export.ExportedProgram:
    buffer = io.BytesIO()
    torch.export.save(torch.export.export(model, inputs), buffer)
    buffer.seek(0)
    return torch.export.load(buffer)


@pytest.fixture
def one_thread():
    """Batch-1 inference of small nets on a shared 2-core machine: one thread is faster (see tests/test_timm.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", [pytest.param(name, marks=[pytest.mark.timm] * (name != "torchvision_resnet18")
                                               + [pytest.mark.slow] * (name in SLOW)) for name in FAMILIES])
def test_module_program_and_torchscript_fold_to_the_same_executed_ops(name, one_thread):
    torch.manual_seed(0)
    model = FAMILIES[name]().eval()
    x = torch.randn(1, 3, 64, 64)
    counts = {}
    for kind, given in (("module", model), (".pt2", saved_program(model, (x,))),
                        ("TorchScript", saved_torchscript(model, (x,)))):
        report = repfx.explain(given, (x,))
        counts[kind] = (report.ops_before, report.ops_after)
    assert counts["TorchScript"] == counts["module"] == counts[".pt2"], counts


class Mixed(nn.Module):
    """The spellings jit.trace records differently: numbers, full slices, a 0-dim buffer, a shape read."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.side = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)
        self.register_buffer("scale", torch.tensor(2.0))  # the model's own tensor: stays a tensor, as in export

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.bn(self.conv(image)) * 0.5 + self.side(image) + 0
        y = torch.cat([y, y.view(y.shape)], 1)[:, :4, :, :] + self.scale * y
        return y * mask, y[:, :2, :, :].mean()


def _op_counts(graph: torch.fx.GraphModule) -> Counter:
    aten = torch.ops.aten
    same = {aten.convolution.default: aten.conv2d.default}  # one op in two spellings, folded alike
    return Counter(same.get(node.target, node.target) for node in graph.graph.nodes if node.op == "call_function")


@pytest.mark.parametrize("dynamic_batch", [False, True], ids=["static", "dynamic_batch"])
def test_torchscript_captures_the_graph_torch_export_gives(dynamic_batch):
    torch.manual_seed(0)
    model, inputs = Mixed().eval(), (torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8))
    expected = capture(model, inputs, dynamic_batch=dynamic_batch).graph
    actual = capture(saved_torchscript(model, inputs), inputs, dynamic_batch=dynamic_batch).graph
    assert _op_counts(actual) == _op_counts(expected)
    assert [n.name for n in actual.graph.nodes if n.op == "placeholder"] == ["image", "mask"]
    assert any(node.op == "get_attr" and node.target == "scale" for node in actual.graph.nodes)


def test_torchscript_folds_to_the_same_values():
    torch.manual_seed(0)
    model, inputs = Mixed().eval(), (torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8))
    folded = repfx.reparameterize(saved_torchscript(model, inputs), inputs)
    with torch.no_grad():
        for expected, actual in zip(model(*inputs), folded(*inputs)):
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert folded.repfx_report.ops_after["batch_norm"] == 0


def test_onnx_names_are_the_models_own(tmp_path):
    """Deploy scripts feed ONNX Runtime by input name: a TorchScript model's are its forward's, as for the module."""
    torch.manual_seed(0)
    model, inputs = Mixed().eval(), (torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8))
    names = {}
    for kind, given in (("module", model), ("TorchScript", saved_torchscript(model, inputs))):
        repfx.export(given, inputs, tmp_path / kind, verify=False)
        proto = onnx.load(str(next((tmp_path / kind).glob("*.onnx"))))
        names[kind] = ([i.name for i in proto.graph.input], [o.name for o in proto.graph.output])
    assert names["TorchScript"] == names["module"] == (["image", "mask"], ["output0", "output1"]), names
