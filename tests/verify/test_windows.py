"""Local proofs on windows of the activations check what the whole maps check.

* on the windows, every border position of a region's output (either border, any stride phase,
  dilation, pad, ceil-mode pooling, chained and branched convolutions) has exactly the value the
  whole map gives it, and so has one interior position of real activations;
* a region that is not spatially local (a global mean, a reshape, a transposed convolution, a
  constant with a spatial extent) gets no windows: it is proven on whole maps;
* a fold wrong only at the low or only at the high border of the map (a padding mistake), in
  either stride phase, is refused; so is a fold wrong only in the interior; both were proven on
  windows, not on whole maps.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from repfx import samples
from repfx.capture.export import capture
from repfx.passes import emit
from repfx.passes.constants import ConstantFolder
from repfx.verify import local
from repfx.verify.windows import _Reaches, windows

from helpers import assert_matches, build, rand, reparam

aten = torch.ops.aten
C = 4


class Branches(nn.Module):
    """The sum of several spatial paths from one input: a region's shape."""

    def __init__(self, *paths: nn.Module) -> None:
        super().__init__()
        self.paths = nn.ModuleList(paths)

    def forward(self, x):
        return sum(path(x) for path in self.paths)


def _pad_then_conv() -> nn.Module:
    return nn.Sequential(nn.ConstantPad2d((1, 2, 0, 1), 0.5), nn.Conv2d(C, C, 3, padding=0))


REGIONS = {
    "repvgg 3x3 + 1x1": lambda: Branches(nn.Sequential(nn.Conv2d(C, C, 3, padding=1), nn.BatchNorm2d(C)),
                                         nn.Sequential(nn.Conv2d(C, C, 1), nn.BatchNorm2d(C)), nn.BatchNorm2d(C)),
    "stride 2": lambda: Branches(nn.Conv2d(C, C, 3, stride=2, padding=1), nn.Conv2d(C, C, 1, stride=2)),
    "dilated 5x5": lambda: nn.Conv2d(C, C, 5, padding=4, dilation=2),
    "asymmetric 1x3 + 3x1": lambda: Branches(nn.Conv2d(C, C, (1, 3), padding=(0, 1)),
                                             nn.Conv2d(C, C, (3, 1), padding=(1, 0))),
    "ceil-mode pool": lambda: nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False),
    "pad then conv": _pad_then_conv,
    "chained stride 2": lambda: nn.Sequential(nn.Conv2d(C, C, 3, stride=2, padding=1), nn.Conv2d(C, C, 3, padding=1),
                                              nn.Conv2d(C, C, 3, stride=2, padding=2)),
}


def _region(model: nn.Module, x: torch.Tensor):
    """The captured graph of ``model`` (evaluation mode), its ops in order, and its output node."""
    gm = capture(model.eval(), (x,)).graph
    nodes = [node for node in gm.graph.nodes if node.op in ("call_function", "get_attr")]
    output = next(node for node in gm.graph.nodes if node.op == "output").args[0][0]
    return gm, nodes, output


def _kept_positions(low: int, high: int, stride: int, size: int, head: int, tail: int,
                    outputs: int) -> list[tuple[int, int]]:
    """(position on the windows, position on the whole map) for every output position whose window lies in
    the head or in the tail; every position that reaches past a border must be among them."""
    dropped = (size - head - tail) // stride
    pairs = []
    for o in range(outputs):
        first, last = o * stride - low, o * stride + high
        if last < head:
            pairs.append((o, o))
        elif first >= size - tail:
            pairs.append((o - dropped, o))
        else:
            assert first >= 0 and last <= size - 1, f"border position {o} was dropped"
    return pairs


@pytest.mark.parametrize("size", [29, 30, 33, 40])
@pytest.mark.parametrize("name", sorted(REGIONS))
def test_on_the_windows_every_border_position_has_the_whole_maps_value(name, size):
    torch.manual_seed(0)
    x = rand(2, C, size, size).double()
    model = build(REGIONS[name]).double()
    gm, nodes, output = _region(model, x)
    is_constant = ConstantFolder(gm).is_constant
    crop = windows(nodes, [output], is_constant)
    assert crop is not None, "a spatially local region gets windows"
    reach, _ = _Reaches(nodes, 2, is_constant).of([output])
    with torch.no_grad():
        whole, cropped = model(x), model(crop.crop(x))  # the module itself: the graph guards its input shape
    assert crop.fits(cropped, whole.shape)
    index = {}  # per spatial dim: kept positions on the windows and on the whole map
    for dim in (-2, -1):
        low, high, stride = reach.low[dim], reach.high[dim], reach.stride[dim]
        geometry = next((d for d in crop.dims if d[0] == dim), None)
        if geometry is None:  # not cropped along this dim: every position is kept
            index[dim] = (torch.arange(whole.shape[dim]),) * 2
            continue
        _, map_size, head, tail, _ = geometry
        pairs = _kept_positions(low, high, stride, map_size, head, tail, whole.shape[dim])
        assert any(o * stride - low >= 0 and o * stride + high < head for _, o in pairs), \
            "one interior window of real activations"
        index[dim] = (torch.tensor([p for p, _ in pairs]), torch.tensor([q for _, q in pairs]))
    kept = cropped.index_select(-2, index[-2][0]).index_select(-1, index[-1][0])
    expected = whole.index_select(-2, index[-2][1]).index_select(-1, index[-1][1])
    torch.testing.assert_close(kept, expected, rtol=1e-12, atol=1e-12)


class GlobalMean(nn.Module):
    def forward(self, x):
        return x + x.mean((2, 3), keepdim=True) * 0 + self.conv(x)

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1)


class Flattened(nn.Module):
    def forward(self, x):
        return self.conv(x).flatten(2).reshape(x.shape)

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1)


class Positional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1)
        self.embedding = nn.Parameter(torch.randn(1, C, 12, 12))

    def forward(self, x):
        return self.conv(x) + self.embedding


@pytest.mark.parametrize("factory", [GlobalMean, Flattened, Positional,
                                     lambda: nn.ConvTranspose2d(C, C, 3, stride=2, padding=1)],
                         ids=["global mean", "reshape", "positional constant", "transposed conv"])
def test_a_region_that_is_not_spatially_local_is_proven_on_whole_maps(factory):
    x = rand(1, C, 12, 12)
    gm, nodes, output = _region(factory(), x)
    assert windows(nodes, [output], ConstantFolder(gm).is_constant) is None


def _spy_windows(monkeypatch) -> list:
    """Every windows() answer the prover gets, in order."""
    answers, real = [], local.windows

    def spy(*args):
        answers.append(real(*args))
        return answers[-1]

    monkeypatch.setattr(local, "windows", spy)
    return answers


def _pad_wrong_at(monkeypatch, border: str) -> None:
    """The emitted conv pads one border with 0.5 instead of zeros: right everywhere else."""
    real = emit.Emitter.emit

    def emit_wrong(self, root, plan):
        out = real(self, root, plan)
        index, conv = next((i, n) for i, n in enumerate(out.nodes) if n.target is aten.conv2d.default)
        assert list(conv.args[4]) == [1, 1]
        values = (0.5, 0.0) if border == "low" else (0.0, 0.5)
        with self.gm.graph.inserting_before(conv):
            low = self.gm.graph.call_function(aten.constant_pad_nd.default, (conv.args[0], [1, 0, 1, 0], values[0]))
            high = self.gm.graph.call_function(aten.constant_pad_nd.default, (low, [0, 1, 0, 1], values[1]))
        conv.args = (high, *conv.args[1:4], [0, 0], *conv.args[5:])
        out.nodes[index:index] = [low, high]
        return out

    monkeypatch.setattr(emit.Emitter, "emit", emit_wrong)


@pytest.mark.parametrize("stride, size", [(1, 16), (2, 15), (2, 16)])
@pytest.mark.parametrize("border", ["low", "high"])
def test_a_fold_wrong_only_at_one_border_is_refused_by_the_proof_on_windows(monkeypatch, border, stride, size):
    """At stride 2 on an even map no window reaches the high padding: that fold is right there, on whole
    maps as on windows; everywhere else it is refused."""
    _pad_wrong_at(monkeypatch, border)
    answers = _spy_windows(monkeypatch)
    model = build(lambda: samples.RepVGGBlock(C, C, stride=stride))
    x = rand(2, C, size, size)
    gm, report = reparam(model, x)
    assert answers and answers[0] is not None, "proven on windows"
    monkeypatch.setattr(local, "windows", lambda *args: None)
    _, on_whole_maps = reparam(model, x)
    reads_the_padding = not (border == "high" and stride == 2 and size % 2 == 0)
    proofs, whole = report.local_proofs, on_whole_maps.local_proofs
    assert (proofs.regions_proven, proofs.regions_failed) == (whole.regions_proven, whole.regions_failed)
    assert report.refusals == on_whole_maps.refusals, "the same refusals, stated from the whole maps"
    if reads_the_padding:
        assert report.rewrites == []
        assert report.local_proofs.regions_failed >= 1 and report.local_proofs.regions_proven == 0
        assert any(r.reason.startswith("local proof failed on input set 0") for r in report.refusals)
    else:
        assert len(report.rewrites) == 1 and report.local_proofs.regions_proven == 1
    assert_matches(model, gm, x)


def test_a_fold_wrong_only_in_the_interior_is_refused_by_the_proof_on_windows(monkeypatch):
    """The merged 3x3 kernel's centre tap is off by 1e-3 for one channel pair: a wrong interior algebra."""
    real = emit.Emitter._constant

    def constant(self, out, kind, value, dtype):
        if kind == "weight":
            value = value.clone()
            value[0, 0, 1, 1] += 1e-3
        return real(self, out, kind, value, dtype)

    monkeypatch.setattr(emit.Emitter, "_constant", constant)
    answers = _spy_windows(monkeypatch)
    model = build(lambda: samples.RepVGGBlock(C, C))
    x = rand(2, C, 32, 32)
    gm, report = reparam(model, x)
    assert answers and answers[0] is not None and answers[0].dims, "proven on windows"
    assert report.rewrites == [] and report.local_proofs.regions_proven == 0
    assert any(r.reason.startswith("local proof failed on input set 0") for r in report.refusals)
    assert_matches(model, gm, x)


def test_a_right_fold_is_proven_on_windows_with_float64_accuracy(monkeypatch):
    answers = _spy_windows(monkeypatch)
    model = build(lambda: nn.Sequential(samples.RepVGGBlock(C, C, stride=2), samples.RepVGGBlock(C, C)))
    gm, report = reparam(model, rand(2, C, 31, 31))
    assert len(answers) == 2 and all(answer is not None for answer in answers)
    assert report.local_proofs.regions_proven == 2 and 0 < report.local_proofs.worst_relative_error <= 1e-12
