"""What makes the rewrite fast keeps it exact: in-place tap placement, stored parameters read as they
are, and deferred kernels that the cost rule prices without computing.

* ``add_placed`` adds exactly what regrouping and placing a kernel would, without building either;
* a form keeps a stored float32/float16 parameter as it is, and every combination still computes in
  float64, bit for bit what upcasting first computes;
* a combination's kernel is deferred: priced by its shape, computed once when read, never when the
  cost rule refuses it; what ``fresh_weight`` hands out never aliases a kept kernel;
* end to end, the folded weights are the float64 algebra rounded once (RepVGG and DBB-like blocks).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from repfx import samples
from repfx.passes import run_pipeline
from repfx.passes.algebra import kernels
from repfx.passes.algebra.deferred import Deferred
from repfx.passes.algebra.forms import ConvForm, compose, merge_parallel, stack_outputs
from repfx.passes.emit import Emitter
from repfx.passes.cost import of_form
from repfx.passes.regions.analyzer import analyze

from helpers import assert_matches, build, rand, reparam


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def _conv(gen, cout, cin, k, groups=1, dtype=torch.float64, padding=None, dilation=1, rank=2,
          bias=True) -> ConvForm:
    weight = torch.randn((cout, cin // groups) + (k,) * rank, generator=gen).to(dtype)
    bias = torch.randn(cout, generator=gen).to(dtype) if bias else None
    pad = (k - 1) * dilation // 2 if padding is None else padding
    return ConvForm.convolution(weight, bias, (1,) * rank, (pad,) * rank, (dilation,) * rank, groups)


def _bn(gen, channels, rank=2, shift=True) -> ConvForm:
    scale, offset = torch.rand(channels, generator=gen) + 0.5, torch.randn(channels, generator=gen)
    return ConvForm.affine(scale, offset if shift else torch.zeros(channels), rank)


def _upcast(form: ConvForm) -> ConvForm:
    return ConvForm(form.weight.double(), form.bias, form.stride, form.padding, form.dilation, form.groups)


@pytest.mark.parametrize("groups, target_groups, offsets, steps", [
    pytest.param(1, 1, (1, 1), (1, 1), id="1x1-into-3x3"),
    pytest.param(4, 1, (0, 2), (1, 1), id="grouped-into-dense"),
    pytest.param(8, 2, (1, 0), (2, 1), id="regroup-and-dilate"),
    pytest.param(8, 8, (0, 0), (1, 1), id="same-grid"),
])
def test_add_placed_adds_exactly_the_regrouped_placed_kernel(gen, groups, target_groups, offsets, steps):
    weight = torch.randn(8, 16 // groups, 2, 1, generator=gen, dtype=torch.float64)
    target = torch.randn(8, 16 // target_groups, 4, 3, generator=gen, dtype=torch.float64)
    placed = kernels.place_kernel(kernels.regroup(weight, groups, target_groups), (4, 3), offsets, steps)
    expected = target + placed
    kernels.add_placed(target, weight, groups, target_groups, offsets, steps)
    assert torch.equal(target, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_stored_parameters_are_kept_and_combinations_are_float64(gen, dtype):
    kxk, pointwise, bn = _conv(gen, 8, 8, 3, dtype=dtype), _conv(gen, 8, 8, 1, dtype=dtype), _bn(gen, 8)
    scale = _bn(gen, 8, shift=False)  # a kxk that zero-pads may follow a scale, not a shift (border rule)
    assert kxk.kernel.dtype == dtype, "a convolution's own weight is kept as stored (no float64 copy up front)"
    for combined, reference in [
        (compose(bn, kxk), compose(bn, _upcast(kxk))),
        (compose(kxk, scale), compose(_upcast(kxk), scale)),
        (compose(pointwise, bn), compose(_upcast(pointwise), bn)),
        (compose(pointwise, kxk), compose(_upcast(pointwise), _upcast(kxk))),
        (merge_parallel([kxk, pointwise, bn]), merge_parallel([_upcast(kxk), _upcast(pointwise), bn])),
        (stack_outputs([kxk, pointwise]), stack_outputs([_upcast(kxk), _upcast(pointwise)])),
    ]:
        assert combined.weight.dtype == torch.float64
        assert torch.equal(combined.weight, reference.weight)
        assert torch.equal(combined.bias, reference.bias)


def test_merge_adds_branches_in_order_into_one_new_kernel(gen):
    """RepVGG's sum, merged pairwise as the analysis does: the float64 sum of the placed kernels."""
    kxk = compose(_bn(gen, 8), _conv(gen, 8, 8, 3))
    pointwise = compose(_bn(gen, 8), _conv(gen, 8, 8, 1))
    identity = _bn(gen, 8)
    merged = merge_parallel([merge_parallel([kxk, pointwise]), identity])
    expected = (kxk.weight + kernels.place_kernel(pointwise.weight, (3, 3), (1, 1), (1, 1))
                + kernels.place_kernel(kernels.regroup(identity.weight, 8, 1), (3, 3), (1, 1), (1, 1)))
    assert torch.equal(merged.weight, expected)
    assert merged.weight.is_contiguous()
    for form in (kxk, pointwise):
        assert merged.weight.data_ptr() != form.weight.data_ptr(), "a branch's kernel was written into"


def test_a_deferred_kernel_is_computed_once_with_its_announced_shape():
    calls = []

    def compute():
        calls.append(1)
        return torch.ones(2, 3, dtype=torch.float64)

    deferred = Deferred((2, 3), compute)
    assert deferred.shape == (2, 3) and not calls
    first = deferred.value()
    assert deferred.value() is first and len(calls) == 1
    fresh = deferred.fresh()
    assert torch.equal(fresh, first) and fresh.data_ptr() != first.data_ptr(), "fresh() aliases the kept kernel"
    with pytest.raises(RuntimeError, match="announced"):
        Deferred((3, 2), lambda: torch.zeros(2, 3)).value()


@pytest.mark.parametrize("outer, inner", [
    pytest.param(lambda g: _bn(g, 8), lambda g: _conv(g, 8, 4, 3), id="bn-after-conv"),
    pytest.param(lambda g: _conv(g, 6, 8, 3, padding=0), lambda g: _bn(g, 8), id="conv-after-bn"),
    pytest.param(lambda g: _conv(g, 16, 8, 5, groups=8), lambda g: _conv(g, 8, 8, 1, bias=False),
                 id="depthwise-after-1x1"),
    pytest.param(lambda g: _conv(g, 12, 8, 1), lambda g: _conv(g, 8, 8, 7, groups=8), id="1x1-after-depthwise"),
    pytest.param(lambda g: _conv(g, 8, 8, 1, groups=2), lambda g: _conv(g, 8, 8, 3, groups=4), id="grouped"),
])
def test_composed_kernels_are_deferred_with_the_shape_they_get(gen, outer, inner):
    form = compose(outer(gen), inner(gen))
    assert isinstance(form.kernel, Deferred)
    announced = form.kernel.shape
    of_form(form, (form.out_channels, 6, 6))  # the cost rule prices it from its shape alone
    assert form.kernel._value is None or form.is_diagonal
    assert form.weight.shape == announced


class ExpandAfterDepthwise(nn.Module):
    """FastViT's ConvMlp: a depthwise 7x7 + BN, then a 1x1 expansion. Merging the two is a dense 7x7
    with 49x the parameters, which the MACs rule refuses."""

    def __init__(self) -> None:
        super().__init__()
        self.dw, self.bn = nn.Conv2d(16, 16, 7, padding=3, groups=16, bias=False), nn.BatchNorm2d(16)
        self.fc = nn.Conv2d(16, 64, 1)

    def forward(self, x):
        return torch.relu(self.fc(self.bn(self.dw(x))))


def test_a_combination_the_cost_rule_refuses_is_priced_but_never_computed(monkeypatch):
    computed = []
    real = kernels.pointwise_after_depthwise
    monkeypatch.setattr(kernels, "pointwise_after_depthwise", lambda *a: computed.append(1) or real(*a))
    model = build(ExpandAfterDepthwise)
    x = rand(1, 16, 12, 12)
    gm, report = reparam(model, x, cost="macs")
    assert report.ops_after["convolution"] == 2, "dw+BN folds, the expansion stays apart"
    assert computed == [], "the refused dense 7x7 was computed"
    assert_matches(model, gm, x)


def test_analysis_of_the_eager_rule_prices_without_computing(monkeypatch):
    """Merging everything (the global rule's first look) builds expressions, not kernels."""
    computed = []
    real = Deferred._computed
    monkeypatch.setattr(Deferred, "_computed", lambda self: computed.append(self.shape) or real(self))
    gm = _captured(build(ExpandAfterDepthwise), rand(1, 16, 12, 12))
    analysis = analyze(gm, "always")
    assert any(isinstance(t.form.kernel, Deferred) for e in analysis.exprs.values() for t in e.terms)
    assert computed == []


def _captured(model: nn.Module, x: torch.Tensor) -> torch.fx.GraphModule:
    from repfx.capture.export import capture
    return capture(model, (x,)).graph


@pytest.mark.parametrize("name", ["repvgg_block", "dbb_block", "dbb_dw_block", "mobileone_block", "acb_block"])
def test_folded_weights_are_the_float64_algebra_rounded_once(name):
    """Each emitted weight is its exact float64 value (kept on the emission for the proofs) rounded once,
    stored contiguous; and the folded graph computes what the model computes."""
    model = build(lambda: samples.build_sample(name))
    x = rand(*samples.sample_input_shape(name))
    gm = _captured(model, x)
    exact: dict[str, torch.Tensor] = {}
    real = Emitter.emit

    def emit(self, root, emission):
        out = real(self, root, emission)
        exact.update(out.exact)
        return out

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Emitter, "emit", emit)
        rounds = run_pipeline(gm, "macs")
    assert any(step.rewrites for step in rounds)
    emitted = {name: value for name, value in gm.named_parameters() if name.startswith("repfx_")}
    assert emitted and emitted.keys() <= exact.keys()
    for key, value in emitted.items():
        assert exact[key].dtype == torch.float64
        assert value.is_contiguous() and torch.equal(value, exact[key].float()), key
    assert_matches(model, gm, x)


def test_proofs_do_not_change_what_is_folded():
    """Local proofs only decide; with and without them the folded weights are bit for bit the same."""
    model = build(lambda: samples.build_sample("repvgg_a0"))
    x = rand(1, 3, 32, 32)
    with_proofs, _ = reparam(model, x)
    without, _ = reparam(model, x, verify=False)
    ours = dict(with_proofs.named_parameters())
    theirs = dict(without.named_parameters())
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)


def test_float16_model_folds_and_proves_in_float64():
    """A float16 model's parameters are read as stored; the fold and its proof are still float64."""
    model = build(lambda: samples.RepVGGBlock(8, 8)).half()
    x = rand(2, 8, 12, 12).half()
    gm, report = reparam(model, x)
    assert len(report.rewrites) == 1 and report.local_proofs.regions_failed == 0
    assert report.local_proofs.worst_relative_error <= 1e-12
    with torch.no_grad():
        expected, actual = model(x).float(), gm(x).float()
    assert (actual - expected).abs().max().item() <= 1e-2 * max(1.0, expected.abs().max().item())
