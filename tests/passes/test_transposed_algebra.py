"""``algebra/transposed.py`` alone, on tensors: each combination computes what the ops it replaces compute.

Float64 throughout, against ``torch.nn.functional``: a transposed form and its
forward equivalent (stride 1), a BN / 1x1 conv after it, a scale / bias-free 1x1
conv before it, kernels of equal geometry added; and the refusals, each with its
reason. ``forms.pointwise_at_rank`` (the same pointwise op at another rank) too.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from repfx.passes.algebra.forms import ConvForm, NotExact, compose, merge_parallel, pointwise_at_rank, stack_outputs
from repfx.passes.algebra.transposed import TransposedConvForm, swap_channel_axes, transposed_form

TRANSPOSED = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
FORWARD = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CIN, COUT = 4, 8
GEOMETRIES = {  # stride, padding, output_padding, dilation, groups
    "stride1-padding1": (1, 1, 0, 1, 1),
    "stride1-groups2": (1, 0, 0, 1, 2),
    "stride2-output_padding1": (2, 1, 1, 1, 1),
    "stride2-dilation2-groups2": (2, 0, 0, 2, 2),
    "stride3-output_padding2-groups4": (3, 1, 2, 1, 4),
    "stride1-dilation2-output_padding1": (1, 1, 1, 2, 1),
    "stride1-padding-beyond-the-kernel": (1, 3, 0, 1, 1),
}
CASES = [pytest.param(rank, geometry, id=f"{rank}d-{name}") for rank in (1, 2, 3)
         for name, geometry in GEOMETRIES.items()]


def run(form, x):
    """What the emitted op computes."""
    if form.transposed:
        return TRANSPOSED[form.rank](x, form.weight, form.bias, form.stride, form.padding, form.output_padding,
                                     form.groups, form.dilation)
    return FORWARD[form.rank](x, form.weight, form.bias, form.stride, form.padding, form.dilation, form.groups)


def randn(*shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def layer(rank, geometry, seed=0, bias=True):
    stride, padding, output_padding, dilation, groups = geometry
    weight = randn(CIN, COUT // groups, *[3] * rank, seed=seed)
    form = transposed_form(weight, randn(COUT, seed=seed + 1) if bias else None, [stride] * rank, [padding] * rank,
                           [output_padding] * rank, [dilation] * rank, groups)
    return form, lambda x: TRANSPOSED[rank](x, weight, form.bias, stride, padding, output_padding, groups, dilation)


def pointwise(cout, cin, rank, seed, bias=True):
    return ConvForm.convolution(randn(cout, cin, *[1] * rank, seed=seed), randn(cout, seed=seed + 1) if bias else None,
                                [1] * rank, [0] * rank, [1] * rank, 1)


def close(a, b):
    assert a.shape == b.shape and (a - b).abs().max().item() <= 1e-12 * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("rank, geometry", CASES)
def test_form_and_its_combinations_compute_the_ops(rank, geometry):
    form, op = layer(rank, geometry)
    x = randn(2, CIN, *[5] * rank, seed=9)
    close(run(form, x), op(x))
    assert form.transposed == (geometry[0] != 1 or geometry[2] != 0 or geometry[1] > geometry[3] * 2)
    bn = ConvForm.affine(randn(COUT, seed=3).abs() + 0.5, randn(COUT, seed=4), rank)
    close(run(compose(bn, form), x), run(bn, op(x)))
    after = pointwise(6, COUT, rank, seed=5)
    close(run(compose(after, form), x), run(after, op(x)))
    scale = ConvForm.affine(randn(CIN, seed=6).abs() + 0.5, torch.zeros(CIN, dtype=torch.float64), rank)
    close(run(compose(form, scale), x), op(run(scale, x)))
    before, x3 = pointwise(CIN, 3, rank, seed=7, bias=False), randn(2, 3, *[5] * rank, seed=10)
    close(run(compose(form, before), x3), op(run(before, x3)))
    other, other_op = layer(rank, geometry, seed=11)
    close(run(merge_parallel([form, other]), x), op(x) + other_op(x))


def test_swapping_channel_axes_twice_gives_the_kernel_back():
    weight = randn(8, 3, 3, 3, seed=0)
    assert swap_channel_axes(weight, 4).shape == (12, 2, 3, 3)  # [C_in=8, C_out/g=3] -> [C_out=12, C_in/g=2]
    assert torch.equal(swap_channel_axes(swap_channel_axes(weight, 4), 4), weight)


def strided():
    return layer(2, (2, 0, 0, 1, 1))[0]


@pytest.mark.parametrize("combine, reason", [
    pytest.param(lambda f: compose(f, ConvForm.affine(torch.ones(CIN, dtype=torch.float64),
                                                        torch.ones(CIN, dtype=torch.float64), 2)),
                 "not constant near the border", id="shift-before"),
    pytest.param(lambda f: compose(ConvForm.convolution(randn(COUT, COUT, 3, 3, seed=1), None, [1, 1], [1, 1],
                                                        [1, 1], 1), f), "only a per-channel affine", id="3x3-after"),
    pytest.param(lambda f: compose(f, ConvForm.zero_pad(CIN, [1, 1])), "only a per-channel scale", id="pad-before"),
    pytest.param(lambda f: compose(f, f), "only a per-channel affine", id="two-transposed-in-a-row"),
    pytest.param(lambda f: merge_parallel([f, layer(2, (2, 1, 1, 1, 1))[0]]), "equal kernel size", id="other-geometry"),
    pytest.param(lambda f: merge_parallel([f, pointwise(COUT, CIN, 2, seed=2)]), "no forward convolution",
                 id="plus-a-forward-conv"),
    pytest.param(lambda f: stack_outputs([f, f]), "stacks with no other branch", id="channel-concat"),
])
def test_inexact_combinations_are_refused_with_the_reason(combine, reason):
    with pytest.raises(NotExact, match=reason):
        combine(strided())


def test_a_pointwise_form_at_another_rank_is_the_same_channel_map():
    form = pointwise(6, 4, 1, seed=0)
    rows = pointwise_at_rank(form, 0)
    tokens = randn(3, 5, 4, seed=1)  # [B, N, C]: the rank-0 form acts on the last dim
    close(F.linear(tokens, rows.weight, rows.bias), run(form, tokens.transpose(1, 2)).transpose(1, 2))
    with pytest.raises(NotExact, match="does not commute with a transpose"):
        pointwise_at_rank(strided(), 0)
    assert isinstance(strided(), TransposedConvForm)
