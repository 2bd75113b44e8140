"""Kernel algebra: every ConvForm combination equals running the original ops (pure tensors, no graphs)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from repfx.passes.algebra import kernels
from repfx.passes.algebra.forms import ConvForm, NotExact, compose, merge_parallel, pad_output, stack_outputs

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
SPATIAL = {1: (11,), 2: (9, 10), 3: (6, 7, 5)}


def run(form: ConvForm, x: torch.Tensor) -> torch.Tensor:
    """Apply a form the way emission will: one conv (or linear) in x's dtype."""
    weight, bias = form.weight.to(x.dtype), form.bias.to(x.dtype)
    if form.rank == 0:
        return F.linear(x, kernels.regroup(weight, form.groups, 1), bias)
    return _CONV[form.rank](x, weight, bias, form.stride, form.padding, form.dilation, form.groups)


def random_conv(gen, rank, cin, cout, k, *, groups=1, stride=1, dilation=1, padding=None, bias=True) -> ConvForm:
    padding = (k - 1) * dilation // 2 if padding is None else padding
    weight = torch.randn((cout, cin // groups) + (k,) * rank, generator=gen, dtype=torch.float64)
    b = torch.randn(cout, generator=gen, dtype=torch.float64) if bias else None
    return ConvForm.convolution(weight, b, (stride,) * rank, (padding,) * rank, (dilation,) * rank, groups)


def random_input(gen, rank, channels, dtype=torch.float64) -> torch.Tensor:
    return torch.randn((2, channels) + SPATIAL[rank], generator=gen, dtype=torch.float64).to(dtype)


def assert_close(actual, expected, dtype=torch.float64):
    tol = {torch.float64: 1e-10, torch.float32: 1e-4}[dtype] * max(1.0, expected.abs().max().item())
    assert actual.shape == expected.shape
    assert (actual.double() - expected.double()).abs().max().item() <= tol


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_batch_norm_scale_shift_matches_eval_batch_norm(gen, rank):
    c = 6
    mean, var = torch.randn(c, generator=gen), torch.rand(c, generator=gen) + 0.5
    weight, bias = torch.randn(c, generator=gen), torch.randn(c, generator=gen)
    x = random_input(gen, rank, c, torch.float32)
    scale, shift = kernels.batch_norm_scale_shift(mean, var, weight, bias, 1e-3)
    expected = F.batch_norm(x, mean, var, weight, bias, training=False, eps=1e-3)
    assert_close(run(ConvForm.affine(scale, shift, rank), x), expected, torch.float32)


@pytest.mark.parametrize("rank", [0, 1, 2, 3])
def test_identity_form_is_identity(gen, rank):
    x = random_input(gen, rank, 5) if rank else torch.randn(3, 5, dtype=torch.float64, generator=gen)
    form = ConvForm.identity(5, rank)
    assert form.is_identity
    assert_close(run(form, x), x)


@pytest.mark.parametrize("groups,new_groups", [(4, 1), (4, 2), (8, 4), (8, 8), (2, 1)])
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_regroup_keeps_the_operator(gen, rank, groups, new_groups):
    form = random_conv(gen, rank, 8, 8, 3, groups=groups)
    x = random_input(gen, rank, 8)
    regrouped = ConvForm(kernels.regroup(form.weight, groups, new_groups), form.bias, form.stride,
                         form.padding, form.dilation, new_groups)
    assert_close(run(regrouped, x), run(form, x))


@pytest.mark.parametrize("kernel,stride,padding", [(3, 1, 1), (2, 2, 0), (3, 2, 1), (5, 1, 2)])
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_avgpool_kernel_matches_avg_pool(gen, rank, kernel, stride, padding):
    pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[rank]
    x = random_input(gen, rank, 4)
    form = ConvForm.convolution(kernels.avgpool_kernel(4, (kernel,) * rank), None, (stride,) * rank,
                                (padding,) * rank, (1,) * rank, 4)
    assert_close(run(form, x), pool(x, kernel, stride, padding))


BRANCH_SETS = {
    "repvgg-3x3+1x1+identity": [dict(k=3), dict(k=1), "identity"],
    "acb-3x3+1x3+3x1": [dict(k=3), dict(k=(1, 3)), dict(k=(3, 1))],
    "replk-13x13dw+5x5dw": [dict(k=13, groups=8), dict(k=5, groups=8)],
    "mixed-groups-dense+grouped2+depthwise": [dict(k=3), dict(k=1, groups=2), dict(k=3, groups=8)],
    "dilated3x3d2+1x1": [dict(k=3, dilation=2), dict(k=1)],
    "dilated3x3d2+5x5": [dict(k=3, dilation=2), dict(k=5)],
    "stride2-3x3+1x1": [dict(k=3, stride=2), dict(k=1, stride=2)],
    "scale+bn-only": [dict(k=3), "scale", "affine"],
}


def _branch(gen, spec, rank, channels) -> ConvForm:
    if spec == "identity":
        return ConvForm.identity(channels, rank)
    if spec == "scale":
        return ConvForm.affine(torch.full((channels,), 0.5, dtype=torch.float64), torch.zeros(channels, dtype=torch.float64), rank)
    if spec == "affine":
        return ConvForm.affine(torch.randn(channels, generator=gen, dtype=torch.float64),
                               torch.randn(channels, generator=gen, dtype=torch.float64), rank)
    size = spec["k"] if isinstance(spec["k"], tuple) else (spec["k"],) * rank
    size = size[:rank] if len(size) >= rank else size + (1,) * (rank - len(size))
    dilation = spec.get("dilation", 1)
    stride = spec.get("stride", 1)
    groups = spec.get("groups", 1)
    padding = spec.get("padding")
    pads = tuple((k - 1) * dilation // 2 for k in size) if padding is None else (padding,) * rank
    weight = torch.randn((channels, channels // groups) + size, generator=gen, dtype=torch.float64)
    bias = torch.randn(channels, generator=gen, dtype=torch.float64)
    return ConvForm.convolution(weight, bias, (stride,) * rank, pads, (dilation,) * rank, groups)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("branches", [pytest.param(v, id=k) for k, v in BRANCH_SETS.items()])
def test_merge_parallel_equals_sum_of_branches(gen, branches, rank, dtype):
    channels = 8
    forms = [_branch(gen, spec, rank, channels) for spec in branches]
    x = random_input(gen, rank, channels, dtype)
    expected = sum(run(form, x.double()) for form in forms)
    merged = merge_parallel(forms)
    assert_close(run(merged, x), expected, dtype)
    assert merged.groups == min(form.groups for form in forms) or merged.groups == 1


def test_merge_keeps_dilation_when_taps_line_up(gen):
    merged = merge_parallel([_branch(gen, dict(k=3, dilation=2), 2, 4), _branch(gen, dict(k=1), 2, 4)])
    assert merged.kernel_size == (3, 3) and merged.dilation == (2, 2)


def test_merge_keeps_depthwise_groups(gen):
    merged = merge_parallel([_branch(gen, dict(k=13, groups=8), 2, 8), _branch(gen, dict(k=5, groups=8), 2, 8),
                             ConvForm.identity(8, 2)])
    assert merged.groups == 8 and merged.kernel_size == (13, 13)


@pytest.mark.parametrize("second", [
    pytest.param(dict(k=3, stride=2), id="different-stride"),
    pytest.param(dict(k=3, padding=0), id="misaligned-centre"),
])
def test_merge_parallel_refuses_inexact_sums(gen, second):
    with pytest.raises(NotExact):
        merge_parallel([_branch(gen, dict(k=3), 2, 4), _branch(gen, second, 2, 4)])


def test_stack_outputs_equals_concat(gen):
    forms = [random_conv(gen, 2, 4, 6, 3), random_conv(gen, 2, 4, 2, 1, padding=0),
             ConvForm.identity(4, 2)]
    x = random_input(gen, 2, 4)
    stacked = stack_outputs(forms)
    assert_close(run(stacked, x), torch.cat([run(f, x) for f in forms], 1))


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("order", ["kxk-then-1x1", "1x1-then-kxk-unpadded", "1x1-nobias-then-kxk-padded"])
def test_compose_equals_sequential_ops(gen, rank, groups, order):
    if order == "kxk-then-1x1":
        inner, outer = random_conv(gen, rank, 8, 8, 3, groups=groups, stride=2), random_conv(gen, rank, 8, 4, 1, padding=0)
    elif order == "1x1-then-kxk-unpadded":
        inner, outer = random_conv(gen, rank, 8, 8, 1, groups=groups), random_conv(gen, rank, 8, 8, 3, padding=0, groups=groups)
    else:
        inner = random_conv(gen, rank, 8, 8, 1, groups=groups, bias=False)
        outer = random_conv(gen, rank, 8, 8, 3, groups=4, stride=2)
    x = random_input(gen, rank, 8)
    assert_close(run(compose(outer, inner), x), run(outer, run(inner, x)))


def test_compose_border_rule_refuses_shift_before_zero_padding(gen):
    inner = random_conv(gen, 2, 4, 4, 1, padding=0)  # has a bias
    outer = random_conv(gen, 2, 4, 4, 3, padding=1)
    with pytest.raises(NotExact, match="border rule"):
        compose(outer, inner)


def test_pad_output_with_the_shift_value_is_a_padded_pointwise_conv(gen):
    """DBB's BN-and-pad: padding with what the op outputs on zeros equals padding its input."""
    inner = random_conv(gen, 2, 4, 4, 1, padding=0)
    x = random_input(gen, 2, 4)
    padded = pad_output(inner, (2, 2), inner.bias)
    border = inner.bias.view(1, -1, 1, 1)
    expected = F.pad(run(inner, x) - border, [2, 2, 2, 2]) + border
    assert_close(run(padded, x), expected)


def test_pad_output_refuses_zero_pad_after_a_shift(gen):
    with pytest.raises(NotExact):
        pad_output(random_conv(gen, 2, 4, 4, 1, padding=0), (1, 1))


def test_linear_forms_compose_and_merge(gen):
    a = ConvForm.convolution(torch.randn(6, 5, generator=gen, dtype=torch.float64), torch.randn(6, generator=gen, dtype=torch.float64), (), (), (), 1)
    b = ConvForm.convolution(torch.randn(6, 5, generator=gen, dtype=torch.float64), None, (), (), (), 1)
    bn = ConvForm.affine(torch.randn(6, generator=gen, dtype=torch.float64), torch.randn(6, generator=gen, dtype=torch.float64), 0)
    x = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    merged = compose(bn, merge_parallel([a, b]))
    assert_close(run(merged, x), run(bn, run(a, x) + run(b, x)))


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("case", ["dw-after-1x1", "dw-multiplier-after-grouped-1x1", "1x1-after-dw",
                                  "grouped-1x1-after-dw"])
def test_depthwise_compositions_equal_sequential_ops(gen, rank, case):
    if case == "dw-after-1x1":
        inner, outer = random_conv(gen, rank, 6, 8, 1), random_conv(gen, rank, 8, 8, 3, groups=8, padding=0)
    elif case == "dw-multiplier-after-grouped-1x1":
        inner = random_conv(gen, rank, 6, 8, 1, groups=2)
        outer = random_conv(gen, rank, 8, 16, 3, groups=8, stride=2, padding=0)
    elif case == "1x1-after-dw":
        inner, outer = random_conv(gen, rank, 8, 8, 5, groups=8, dilation=2), random_conv(gen, rank, 8, 4, 1, padding=0)
    else:
        inner, outer = random_conv(gen, rank, 8, 8, 3, groups=8, stride=2), random_conv(gen, rank, 8, 6, 1, groups=2, padding=0)
    x = random_input(gen, rank, inner.in_channels)
    assert_close(run(compose(outer, inner), x), run(outer, run(inner, x)))
