"""``algebra/dense.py``: a conv on a map of one size as one whole-map conv, and that matrix re-read on other layouts.

Checked on values: the whole-map form applied to random maps of exactly that size computes
what the conv computes, flattened (any groups, stride, dilation, padding); ``as_flat`` on the
flattened values, ``rebase`` on another layout of them. Groups stay groups.
"""

from __future__ import annotations

import pytest
import torch

from repfx.passes.algebra.dense import as_flat, output_grid, rebase, whole_map
from repfx.passes.algebra.forms import ConvForm
from repfx.passes.refusals import NotExact


def run(form: ConvForm, x: torch.Tensor) -> torch.Tensor:
    rank = form.rank
    return torch.convolution(x, form.weight.double(), form.bias, list(form.stride), list(form.padding),
                             list(form.dilation), False, [0] * rank, form.groups)


def conv(cin, cout, kernel, groups=1, stride=1, padding=0, dilation=1, rank=2):
    weight = torch.randn(cout, cin // groups, *[kernel] * rank, dtype=torch.float64)
    return ConvForm.convolution(weight, torch.randn(cout, dtype=torch.float64), [stride] * rank, [padding] * rank,
                                [dilation] * rank, groups)


@pytest.mark.parametrize("form, grid", [
    pytest.param(conv(4, 4, 3, groups=4, padding=1), (4, 4, 4), id="depthwise-3x3-same"),
    pytest.param(conv(4, 6, 3, groups=2, stride=2, padding=1), (4, 5, 5), id="groups2-stride2"),
    pytest.param(conv(2, 3, 3, dilation=2, padding=2), (2, 6, 4), id="dilated"),
    pytest.param(conv(3, 2, 3, rank=1, padding=0), (3, 7), id="1d-valid"),
])
def test_whole_map_form_is_the_conv_on_maps_of_that_size(form, grid):
    torch.manual_seed(0)
    x = torch.randn(5, *grid, dtype=torch.float64)
    matrix = whole_map(form, grid)
    assert matrix.groups == form.groups and all(k == n for k, n in zip(matrix.kernel_size, grid[1:]))
    expected = run(form, x).reshape(5, -1)
    assert torch.allclose(run(matrix, x).reshape(5, -1), expected)
    assert output_grid(form, grid)[0] * torch.Size(output_grid(form, grid)[1:]).numel() == matrix.out_channels
    flat = as_flat(form, grid, 2)
    assert torch.allclose(run(flat, x.reshape(5, -1, 1, 1)).reshape(5, -1), expected)


def test_rebase_reads_the_same_values_in_another_layout_and_keeps_whole_channel_groups():
    torch.manual_seed(0)
    form = whole_map(conv(4, 4, 3, groups=4, padding=1), (4, 4, 4))
    x = torch.randn(3, 4, 4, 4, dtype=torch.float64)
    for grid, groups in (((64, 1, 1), 4), ((8, 2, 4), 4), ((2, 32), 2)):
        other = rebase(form, grid)
        assert other.groups == groups
        assert torch.allclose(run(other, x.reshape(3, *grid)).reshape(3, -1), run(form, x).reshape(3, -1))


def test_a_form_that_does_not_read_the_grid_is_refused():
    with pytest.raises(NotExact, match="does not read"):
        whole_map(conv(4, 4, 3), (8, 4, 4))
    with pytest.raises(NotExact, match="values per partition"):
        rebase(whole_map(conv(4, 4, 1), (4, 2, 2)), (4, 4, 4))
