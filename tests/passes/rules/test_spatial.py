"""Serial spatial kernels, crops, whole-map pools and the parameter bound, at pass level (issue 16, items 1, 4, 8).

* ``1xk -> kx1`` (depthwise or dense, strided) is one kxk; beside a kxk it adds into it (RepNeXt).
  Must not: a shift between the two when the outer one zero-pads (the border rule).
* A branch on ``x[:, :, 1:-1, :]`` is a conv of ``x`` with less padding (ACNet's crop).
  Must not: a crop by one pixel on one side only (not on the output grid).
* A pool over the whole map never becomes a kernel (``whole-map-pool``).
* ``max_param_growth`` refuses a merge that pays in time but holds too many parameters
  (``param-growth``); a rewrite says its parameters before and after, and what growth bought.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pass_graphs import GraphBuilder, assert_folds, assert_unchanged, fold_to_fixed_point
from repfx.passes.cost import DEFAULT_MAX_PARAM_GROWTH, DeviceProfile, LatencyCost

aten = torch.ops.aten
C = 8
LAUNCH_BOUND = LatencyCost(profile=DeviceProfile("launch-bound", "cpu", {"float32": 1e12}, 1e12, 1e-4))


def conv(g, x, weight_shape, padding, groups=1, stride=(1, 1)):
    """A conv with a bias, every argument written: what the fold emits."""
    return g.call(aten.conv2d.default, x, g.randn(*weight_shape), g.randn(weight_shape[0]), list(stride),
                  list(padding), [1, 1], groups)


def factorized(k: int = 3, groups: int = 1, shift: bool = False, square: bool = False, stride: int = 1):
    """``conv_kx1(conv_1xk(x))``, the kx1 with ``stride`` (+ BN between when ``shift``; + a kxk branch beside when
    ``square``), then BN."""
    g = GraphBuilder()
    x = g.input("x", 2, C, 9, 10)
    y = g.conv(x, C, (1, k), padding=[0, k // 2], groups=groups)
    y = g.conv(g.batch_norm(y) if shift else y, C, (k, 1), padding=[k // 2, 0], groups=groups, stride=stride)
    if square:
        y = g.call(aten.add.Tensor, g.batch_norm(g.conv(x, C, k, padding=k // 2, groups=groups, stride=stride)), y)
    return g.build(g.batch_norm(y))


def one_conv(k: int = 3, groups: int = 1, stride: int = 1):
    g = GraphBuilder()
    return g.build(conv(g, g.input("x", 2, C, 9, 10), (C, C // groups, k, k), (k // 2, k // 2), groups,
                        (stride, stride)))


@pytest.mark.parametrize("k, groups, square, stride", [
    pytest.param(3, C, False, 1, id="dw-1x3-3x1"),
    pytest.param(3, 1, False, 1, id="dense-1x3-3x1"),
    pytest.param(7, 1, False, 2, id="dense-1x7-7x1-strided"),
    pytest.param(3, C, True, 1, id="repnext-beside-dw-3x3"),
    pytest.param(5, 1, True, 2, id="beside-dense-5x5-strided"),
])
def test_a_factorized_pair_is_one_square_kernel(k, groups, square, stride):
    assert_folds(factorized(k, groups, square=square, stride=stride), one_conv(k, groups, stride), cost="always")


def test_beside_its_square_branch_the_pair_merges_by_macs_too():
    """The region's kernel does not grow: the pair's 3x3 adds into the 3x3 beside it, fewer MACs than written."""
    assert_folds(factorized(3, C, square=True), one_conv(3, C), cost="macs")


def test_a_shift_between_the_pair_with_zero_padding_is_not_merged():
    """1x3 -> BN -> 3x1: the 3x1 pads with zeros where one conv would see the BN's shift."""
    g = GraphBuilder()
    x = g.input("x", 2, C, 9, 10)
    expected = g.build(conv(g, conv(g, x, (C, C, 1, 3), (0, 1)), (C, C, 3, 1), (1, 0)))
    assert_folds(factorized(shift=True), expected, cost="always", refused="border rule: the inner op adds a non-zero "
                                                                           "shift and the outer op zero-pads")


def cropped(rows: slice, cols: slice, bn: bool = True):
    """ACNet's ``padding < k // 2`` block: 3x3 on x, 3x1 on ``x[..., cols]``, 1x3 on ``x[..., rows, :]``, each + BN."""
    g = GraphBuilder()
    x = g.input("x", 2, C, 9, 10)
    norm = g.batch_norm if bn else (lambda y: y)
    square = norm(g.conv(x, C, 3))
    ver = norm(g.conv(g.call(aten.slice.Tensor, x, 3, cols.start, cols.stop), C, (3, 1)))
    hor = norm(g.conv(g.call(aten.slice.Tensor, x, 2, rows.start, rows.stop), C, (1, 3)))
    return g.build(g.call(aten.add.Tensor, g.call(aten.add.Tensor, square, ver), hor))


def test_branches_on_crops_of_one_input_are_one_conv():
    g = GraphBuilder()
    assert_folds(cropped(slice(1, -1), slice(1, -1)), g.build(conv(g, g.input("x", 2, C, 9, 10), (C, C, 3, 3),
                                                                     (0, 0))))


def test_a_crop_written_with_the_size_is_the_same_crop():
    g = GraphBuilder()
    assert_folds(cropped(slice(1, 8), slice(1, 9)), g.build(conv(g, g.input("x", 2, C, 9, 10), (C, C, 3, 3), (0, 0))))


def test_a_crop_by_one_pixel_on_one_side_is_not_on_the_output_grid():
    """``x[:, :, 1:, :]`` then a 2x3 beside a 3x3 of x: the branches' sizes agree, their grids do not (the crop
    would be the 3x3's lower two rows: no symmetric padding says so)."""
    g = GraphBuilder()
    x = g.input("x", 2, C, 9, 10)
    shifted = g.conv(g.call(aten.slice.Tensor, x, 2, 1, 9223372036854775807), C, (2, 3))
    before = g.build(g.call(aten.add.Tensor, g.conv(x, C, 3), shifted))
    result = assert_unchanged(before, cost="always", refused="crops 1 pixel(s) before and 0 after along dim 2")
    assert {refusal.code for refusal in result.refusals} >= {"padding"}


def test_a_cropped_branch_alone_keeps_its_crop_and_folds_its_bn():
    g = GraphBuilder()
    before = g.build(g.batch_norm(g.conv(g.call(aten.slice.Tensor, g.input("x", 2, C, 9, 10), 2, 1, -1), C, 3,
                                         padding=[0, 1])))
    g = GraphBuilder()
    expected = g.build(conv(g, g.call(aten.slice.Tensor, g.input("x", 2, C, 9, 10), 2, 1, -1), (C, C, 3, 3), (0, 1)))
    assert_folds(before, expected, cost="always")


def test_a_crop_before_a_padded_conv_is_refused_by_the_border_rule():
    g = GraphBuilder()
    x = g.input("x", 2, C, 9, 10)
    before = g.build(g.call(aten.add.Tensor, g.conv(g.call(aten.slice.Tensor, x, 2, 1, -1), C, 3, padding=[1, 0]),
                            g.conv(x, C, 3, padding=[0, 0])))
    assert_unchanged(before, cost="always", refused="zero-pads a crop")


@pytest.mark.parametrize("dim, start, end", [(1, 0, 4), (0, 0, 1), (3, 0, -1)])
def test_a_slice_that_is_no_spatial_crop_is_left_alone(dim, start, end):
    """A channel or batch slice is another tensor; a strip DBB writes its border into is the border fill's."""
    g = GraphBuilder()
    x = g.input("x", 2, C, 9, 10)
    sliced = g.call(aten.slice.Tensor, x, dim, start, end)
    if dim == 3:
        sliced = g.call(aten.copy.default, sliced, g.call(aten.expand.default, g.randn(1, C, 1, 1), [2, C, 9, 9]))
    result = assert_unchanged(g.build(sliced), cost="always")
    assert not result.refusals


def test_a_slice_that_keeps_every_pixel_is_the_identity():
    g = GraphBuilder()
    x = g.input("x", 2, C, 9, 10)
    before = g.build(g.conv(g.call(aten.slice.Tensor, x, 2, 0, 9223372036854775807), C, 3))
    g = GraphBuilder()
    assert_folds(before, g.build(conv(g, g.input("x", 2, C, 9, 10), (C, C, 3, 3), (0, 0))), cost="always")


def whole_map_pool(size: int = 8, window: int = 8):
    g = GraphBuilder()
    x = g.input("x", 2, C, size, size)
    return g.build(g.conv(g.call(aten.avg_pool2d.default, x, [window, window]), 2, 1, bias=True))


def test_a_pool_over_the_whole_map_never_becomes_a_kernel():
    result = assert_unchanged(whole_map_pool(), cost="always", refused="window spans the whole 8x8 feature map")
    assert [refusal.code for refusal in result.refusals] == ["whole-map-pool"]


def test_a_pool_over_part_of_the_map_still_folds():
    g = GraphBuilder()
    expected = g.build(conv(g, g.input("x", 2, C, 8, 8), (2, C, 4, 4), (0, 0), stride=(4, 4)))
    assert_folds(whole_map_pool(window=4), expected, cost="always")


def depthwise_then_pointwise():
    """dw 3x3 -> BN -> 1x1 (16 channels): as one dense 3x3, 2,320 parameters for 432 (5.4x)."""
    g = GraphBuilder()
    x = g.input("x", 2, 16, 8, 8)
    return g.build(g.conv(g.batch_norm(g.conv(x, 16, 3, padding=1, groups=16)), 16, 1))


def test_a_merge_that_pays_but_grows_the_parameters_too_much_is_refused():
    g = GraphBuilder()
    x = g.input("x", 2, 16, 8, 8)
    expected = g.build(g.conv(conv(g, x, (16, 1, 3, 3), (1, 1), 16), 16, 1))
    result = assert_folds(depthwise_then_pointwise(), expected, cost=LAUNCH_BOUND, refused="max_param_growth=4")
    assert "param-growth" in {refusal.code for refusal in result.refusals}
    assert DEFAULT_MAX_PARAM_GROWTH == LAUNCH_BOUND.max_param_growth == 4


def test_without_a_bound_it_merges_and_says_what_growth_bought():
    g = GraphBuilder()
    expected = g.build(conv(g, g.input("x", 2, 16, 8, 8), (16, 16, 3, 3), (1, 1)))
    result = assert_folds(depthwise_then_pointwise(), expected,
                          cost=dataclasses.replace(LAUNCH_BOUND, max_param_growth=None))
    (rewrite,) = result.rewrites
    assert (rewrite.params_before, rewrite.params_after) == (16 * 9 + 4 * 16 + 16 * 16, 16 * 16 * 9 + 16)
    assert rewrite.growth_note.startswith("parameters 464 -> 2,320 (5.0x) for ") and "ms as written ->" in \
        rewrite.growth_note and "ms merged (modeled on launch-bound" in rewrite.growth_note


def test_a_rewrite_that_does_not_double_its_parameters_has_no_note():
    (step,) = [r for r in fold_to_fixed_point(factorized(3, C, square=True), "always") if r.rewrites]
    (rewrite,) = step.rewrites
    assert rewrite.params_after < rewrite.params_before and rewrite.growth_note == ""


@pytest.mark.parametrize("bound", [0.5, float("nan"), float("inf"), True, "4"])
def test_a_bound_below_one_or_not_a_number_is_refused(bound):
    from repfx.passes.cost import check_param_growth
    with pytest.raises(ValueError, match="max_param_growth"):
        check_param_growth(bound)
