"""Two spatial kernels in a row and crops, as pure algebra: ``compose`` is their full convolution where exact.

Each case runs the two ops as written and the one composed form on inputs of several
sizes (a composition must hold at every size, strides and crops included) in float64;
the must-not cases are the border rule's: a padded outer op after a kernel that reads
real pixels there, a shift between two kernels when the outer pads, a pad after a crop.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from repfx.passes.algebra.forms import ConvForm, NotExact, compose, merge_parallel, pad_output

SIZES = ((9, 10), (12, 13), (7, 16))


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def form(gen, cin, cout, kernel, *, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, bias=True):
    weight = torch.randn((cout, cin // groups) + tuple(kernel), generator=gen, dtype=torch.float64)
    shift = torch.randn(cout, generator=gen, dtype=torch.float64) if bias else None
    return ConvForm.convolution(weight, shift, stride, padding, dilation, groups)


def run(f: ConvForm, x: torch.Tensor) -> torch.Tensor:
    """A form as the fold emits it: a crop (negative padding) slices the input first."""
    padding = list(f.padding)
    for dim, p in enumerate(padding):
        if p < 0:
            x, padding[dim] = x.narrow(dim + 2, -p, x.shape[dim + 2] + 2 * p), 0
    return F.conv2d(x, f.weight, f.bias, f.stride, padding, f.dilation, f.groups)


def assert_composes(outer: ConvForm, inner: ConvForm, channels: int) -> ConvForm:
    merged = compose(outer, inner)
    for size in SIZES:
        x = torch.randn((2, channels) + size, dtype=torch.float64)
        want, got = run(outer, run(inner, x)), run(merged, x)
        assert got.shape == want.shape and (got - want).abs().max().item() <= 1e-10 * max(1.0, want.abs().max().item())
    return merged


@pytest.mark.parametrize("case", [
    pytest.param(lambda g: (form(g, 4, 4, (3, 1), padding=(1, 0), groups=4), form(g, 4, 4, (1, 3), padding=(0, 1),
                                                                                     groups=4, bias=False)),
                 id="dw-1x3-then-3x1"),
    pytest.param(lambda g: (form(g, 6, 4, (7, 1), padding=(3, 0)), form(g, 4, 6, (1, 7), padding=(0, 3), bias=False)),
                 id="dense-1x7-then-7x1"),
    pytest.param(lambda g: (form(g, 4, 4, (3, 1), padding=(1, 0), stride=(2, 1), groups=2),
                            form(g, 4, 4, (1, 3), padding=(0, 1), stride=(1, 2), bias=False)), id="strided-grouped"),
    pytest.param(lambda g: (form(g, 4, 4, (3, 3)), form(g, 4, 4, (3, 3), padding=(1, 1), stride=(2, 2))),
                 id="unpadded-3x3-after-strided-3x3"),
    pytest.param(lambda g: (form(g, 4, 4, (3, 3), dilation=(2, 1)), form(g, 4, 4, (3, 3), dilation=(1, 2))),
                 id="dilated"),
    pytest.param(lambda g: (form(g, 4, 8, (3, 3), groups=4), form(g, 4, 4, (2, 2), groups=4)), id="dw-multiplier"),
    pytest.param(lambda g: (form(g, 4, 4, (3, 3), padding=(1, 1)), form(g, 4, 4, (3, 3), padding=(2, 2), bias=False)),
                 id="outer-pads-where-inner-reads-only-zeros"),
])
def test_two_spatial_kernels_compose_into_their_full_convolution(gen, case):
    outer, inner = case(gen)
    assert_composes(outer, inner, inner.in_channels)


def test_a_factorized_pair_beside_its_square_branch_is_one_square_kernel(gen):
    """RepNeXt / Inception: dw 1x3 -> 3x1 is a 3x3, which adds into a parallel dw 3x3 without growing it."""
    pair = compose(form(gen, 4, 4, (3, 1), padding=(1, 0), groups=4),
                   form(gen, 4, 4, (1, 3), padding=(0, 1), groups=4, bias=False))
    merged = merge_parallel([form(gen, 4, 4, (3, 3), padding=(1, 1), groups=4), pair])
    assert merged.kernel_size == (3, 3) and merged.groups == 4


@pytest.mark.parametrize("case, reason", [
    pytest.param(lambda g: (form(g, 4, 4, (3, 1), padding=(1, 0)), form(g, 4, 4, (1, 3), padding=(0, 1))),
                 "border rule: the inner op adds a non-zero shift", id="1x3-shift-then-padded-3x1"),
    pytest.param(lambda g: (form(g, 4, 4, (3, 3), padding=(1, 1)), form(g, 4, 4, (3, 3), padding=(1, 1), bias=False)),
                 "pads the output of a spatial convolution", id="padded-3x3-after-3x3"),
    pytest.param(lambda g: (form(g, 4, 4, (3, 3), padding=(1, 1)), ConvForm.zero_pad(4, (-1, 0))),
                 "zero-pads a crop", id="padded-3x3-after-a-crop"),
])
def test_compositions_the_border_forbids_are_refused(gen, case, reason):
    outer, inner = case(gen)
    with pytest.raises(NotExact, match=reason) as refusal:
        compose(outer, inner)
    assert refusal.value.code == "border"


def test_a_crop_then_a_conv_is_the_conv_with_less_padding(gen):
    """ACNet: a 3x1 on ``x[:, :, :, 1:-1]`` is a 3x1 of ``x`` with padding -1 along W, on the 3x3's grid."""
    crop = ConvForm.zero_pad(4, (0, -1))
    branch = assert_composes(form(gen, 4, 4, (3, 1)), crop, 4)
    assert branch.padding == (0, -1)
    square = form(gen, 4, 4, (3, 3))
    merged = merge_parallel([square, branch])
    assert merged.padding == (0, 0) and merged.kernel_size == (3, 3)
    x = torch.randn(2, 4, 9, 10, dtype=torch.float64)
    assert (run(merged, x) - run(square, x) - run(branch, x)).abs().max().item() < 1e-10


def test_a_crop_of_a_conv_output_reads_fewer_outputs(gen):
    assert assert_composes(ConvForm.zero_pad(4, (-1, -2)), form(gen, 4, 4, (3, 3), stride=(2, 1), padding=(1, 1)),
                           4).padding == (-1, -1)


def test_padding_a_crop_is_refused():
    with pytest.raises(NotExact, match="padding a crop"):
        pad_output(ConvForm.zero_pad(4, (-1, 0)), (1, 1))
