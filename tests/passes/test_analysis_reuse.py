"""What the analyses of one round share changes nothing they decide.

* the analyses of one unchanged graph (merge everything, then op by op, then each retry
  with new boundaries) fold each constant once, through one ``ConstantFolder``;
* with that folder shared, a round chooses the regions, refusals and decisions it chose
  with a fresh folder per analysis, and the folded graph is the same, node for node and
  weight for weight;
* a form works out what it is (pointwise, diagonal, identity) once, and the answer is
  what the definitions give.
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from torch import fx, nn

from repfx import samples
from repfx.capture.export import capture
from repfx.passes import run_pipeline
from repfx.passes.algebra.forms import ConvForm, compose, merge_parallel
from repfx.passes.constants import ConstantFolder
from repfx.passes.fold import choose_regions
from repfx.passes.regions import analyzer as analyzer_module
from repfx.targets import cost_rule

from helpers import build, rand



class ConvMlp(nn.Module):
    """FastViT's ConvMlp: merging the depthwise 7x7 + BN into the 1x1 expansion adds MACs, so the
    region is refused and the op-by-op analysis runs too; then a chain the partition cuts."""

    def __init__(self) -> None:
        super().__init__()
        self.dw, self.bn = nn.Conv2d(16, 16, 7, padding=3, groups=16, bias=False), nn.BatchNorm2d(16)
        self.fc1, self.fc2 = nn.Conv2d(16, 64, 1), nn.Conv2d(64, 16, 1)
        self.chain = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.Conv2d(16, 32, 1),
                                   nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32))

    def forward(self, x):
        return self.chain(torch.relu(self.fc2(torch.relu(self.fc1(self.bn(self.dw(x)))))))


# dbb: constants computed inside the graph (BN-and-pad values); mobileone, repvgg, acb: wide regions;
# conv_mlp: a refused region and a chain, so every analysis a round can build is built.
CASES = {name: (lambda name=name: samples.build_sample(name), samples.sample_input_shape(name))
         for name in ["dbb_block", "mobileone_block", "repvgg_a0", "acb_block"]}
CASES["conv_mlp"] = (ConvMlp, (1, 16, 12, 12))


def _captured(name: str) -> fx.GraphModule:
    factory, shape = CASES[name]
    return capture(build(factory), (rand(*shape),)).graph


def _fresh_folder_per_analysis(monkeypatch) -> None:
    """The behaviour before the folder was shared: every analyzer folds constants on its own."""
    real = analyzer_module.Analyzer.__init__

    def init(self, gm, cost, boundaries=frozenset(), constants=None):
        real(self, gm, cost, boundaries, None)

    monkeypatch.setattr(analyzer_module.Analyzer, "__init__", init)


def _observed(gm: fx.GraphModule, cost: str) -> tuple:
    rounds = run_pipeline(gm, cost_rule(cost))
    weights = {name: value.clone() for name, value in gm.state_dict().items()}
    results = [(step.modified, [(r.root, r.kind, r.kernel_shapes) for r in step.rewrites], step.refusals,
                [str(decision) for decision in step.decisions]) for step in rounds]
    return gm.code, weights, results


@pytest.mark.parametrize("cost", ["macs", "always", "latency"])
@pytest.mark.parametrize("name", CASES)
def test_a_shared_folder_folds_the_same_graph(monkeypatch, name, cost):
    gm = _captured(name)
    theirs = copy.deepcopy(gm)
    code, weights, results = _observed(gm, cost)
    with monkeypatch.context() as patch:
        _fresh_folder_per_analysis(patch)
        their_code, their_weights, their_results = _observed(theirs, cost)
    assert results == their_results
    assert code == their_code
    assert weights.keys() == their_weights.keys()
    assert all(torch.equal(weights[key], their_weights[key]) for key in weights)


def test_the_analyses_of_one_round_fold_each_constant_once(monkeypatch):
    evaluated: Counter = Counter()
    real = ConstantFolder._evaluate

    def evaluate(self, node):
        evaluated[node] += 1
        return real(self, node)

    monkeypatch.setattr(ConstantFolder, "_evaluate", evaluate)
    choose_regions(_captured("conv_mlp"), "macs")
    assert evaluated, "no constant was folded"
    assert max(evaluated.values()) == 1, [node.name for node, count in evaluated.items() if count > 1]


def _forms(gen: torch.Generator) -> list[ConvForm]:
    conv = ConvForm.convolution(torch.randn(4, 4, 3, 3, generator=gen), None, (1, 1), (1, 1), (1, 1), 1)
    pointwise = ConvForm.convolution(torch.randn(4, 4, 1, 1, generator=gen), None, (1, 1), (0, 0), (1, 1), 1)
    scale = ConvForm.affine(torch.rand(4, generator=gen) + 0.5, torch.zeros(4), 2)
    return [conv, pointwise, scale, ConvForm.identity(4, 2), ConvForm.zero_pad(4, (1, 1)),
            ConvForm.affine(torch.ones(4), torch.randn(4, generator=gen), 2),
            compose(scale, ConvForm.identity(4, 2)), compose(scale, pointwise), merge_parallel([conv, pointwise])]


def test_what_a_form_is_is_worked_out_once_and_as_defined():
    for form in _forms(torch.Generator().manual_seed(0)):
        pointwise = all(k == 1 for k in form.kernel.shape[2:]) and all(s == 1 for s in form.stride)
        diagonal = pointwise and form.groups == form.in_channels == form.out_channels
        identity = (diagonal and not any(form.padding) and bool(torch.all(form.weight == 1))
                    and not bool(torch.any(form.bias)))
        assert (form.is_pointwise, form.is_diagonal, form.is_identity) == (pointwise, diagonal, identity)
        assert {"is_pointwise", "is_diagonal", "is_identity"} <= vars(form).keys(), "not kept on the form"


def test_a_decision_lists_the_ops_kept_apart_in_graph_order():
    """A region's ops are a set of nodes, which iterates in memory order; the work priced (and the
    decision the report shows) follows the graph instead, the same in every run."""
    seen = set()
    for _ in range(4):
        rounds = run_pipeline(_captured("conv_mlp"), cost_rule("macs"))
        seen.add(tuple(str(decision) for decision in rounds[-1].decisions))
    assert len(seen) == 1
    chain = next(text for text in seen.pop() if "merged [3x3 16->32]" in text)
    assert "apart [3x3 16->16 g16 + 1x1 16->32]" in chain, chain
