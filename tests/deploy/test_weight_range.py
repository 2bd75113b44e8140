"""fp16 / bf16 range check of the constants of a re-parameterized graph.

Models are built with known weights and BN statistics so each expected count is exact:
the overflow case is a channel whose folded scale is gamma / sqrt(var + eps) ~ 7.07e7.
"""

from __future__ import annotations

import operator
from functools import reduce

import pytest
import torch
from torch import fx, nn

import repfx
from repfx.deploy.weight_range import (
    LayerRange,
    check_tensor,
    format_range_table,
    summarize_ranges,
    weight_range_report,
)
from repfx.samples import build_sample, randomize_bn_

X = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def conv_bn(*, big_channel: bool) -> nn.Module:
    """conv(3->4, 3x3) + BN + ReLU whose folded weights are exactly predictable.

    All 108 kernel values are 1e-4 except the 9 values of input channel 0 of output channel
    0, which are 0.01. Output channel 0, when ``big_channel``, has running_var 1e-12,
    eps 1e-12, gamma 100: scale 100 / sqrt(2e-12) ~ 7.07e7, so those 9 values fold to
    ~7.07e5 (> 65504) and the other 18 of that channel to ~7.07e3 (< 65504).
    """
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4, eps=1e-12), nn.ReLU())
    with torch.no_grad():
        conv, bn = model[0], model[1]
        conv.weight.fill_(1e-4)
        conv.weight[0, 0] = 0.01
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0)
        bn.weight.fill_(1.0)
        bn.bias.fill_(0.5)
        if big_channel:
            bn.running_var[0] = 1e-12
            bn.weight[0] = 100.0
    return model.eval()


def conv_weight_row(gm: fx.GraphModule, rows: list[LayerRange]) -> LayerRange:
    """The row of the (single) convolution's weight, located through the graph."""
    (conv,) = [n for n in gm.graph.nodes if n.op == "call_function" and "conv" in str(n.target)]
    (row,) = [r for r in rows if r.tensor == conv.args[1].target]
    assert row.node == conv.name
    return row


def test_sample_has_no_problem():
    # RepVGG-A0's weights at a small input: the folded weights do not depend on the input size.
    model = randomize_bn_(build_sample("repvgg_a0"), 0).eval()
    gm = repfx.reparameterize(model, (torch.randn(1, 3, 64, 64),), verify=False)

    rows = weight_range_report(gm)

    params = [n for n in gm.graph.nodes if n.op == "get_attr"]
    assert len(rows) == len(params), "every used floating constant is checked"
    summary = summarize_ranges(rows)
    assert (summary.overflow, summary.problems) == (0, ())
    assert summary.values == sum(reduce(getattr, n.target.split("."), gm).numel() for n in params)
    assert format_range_table(rows).count("\n") == 0, "no problem: the summary line alone"


def test_folded_bn_overflow_is_reported_on_its_layer():
    gm = repfx.reparameterize(conv_bn(big_channel=True), (X,))

    rows = weight_range_report(gm, torch.float16)

    row = conv_weight_row(gm, rows)
    assert (row.numel, row.overflow, row.underflow) == (108, 9, 0)
    assert row.max_abs == pytest.approx(0.01 * 100 / 2e-12 ** 0.5, rel=1e-5)
    assert summarize_ranges(rows).problems == (row,)
    assert all(not r.has_problem() for r in rows if r is not row), "the folded bias is in range"


def test_same_model_is_fine_in_bf16():
    gm = repfx.reparameterize(conv_bn(big_channel=True), (X,))

    rows = weight_range_report(gm, torch.bfloat16)

    summary = summarize_ranges(rows)
    assert (summary.dtype, summary.overflow, summary.underflow) == (torch.bfloat16, 0, 0)


def test_normal_bn_does_not_overflow():
    gm = repfx.reparameterize(conv_bn(big_channel=False), (X,))
    assert summarize_ranges(weight_range_report(gm)).overflow == 0


def test_tiny_weights_underflow_in_fp16_only():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    with torch.no_grad():
        model[0].weight.fill_(0.1)
        model[0].weight[1, :, 0, :] = 1e-6  # 9 values: fp16 subnormal (lose precision)
        model[0].weight[2, 0, 0, 0] = 1e-9  # 1 value: flushes to zero in fp16
        model[0].weight[3, 0] = 0.0  # exact zeros are not underflow
        model[0].bias.fill_(0.5)
    gm = repfx.reparameterize(model, (X,))

    row = conv_weight_row(gm, weight_range_report(gm))
    assert (row.overflow, row.underflow) == (0, 10)
    assert row.min_abs_nonzero == pytest.approx(1e-9)

    bf16 = conv_weight_row(gm, weight_range_report(gm, torch.bfloat16))
    assert (bf16.overflow, bf16.underflow) == (0, 0)


def test_stray_subnormals_are_counted_but_not_flagged():
    """Trained and random weights always have a few values near zero; that is no problem."""
    weight = torch.full((1000,), 0.05)
    weight[:10] = 1e-6  # 1% of the values
    rows = [LayerRange("conv", "w", weight.numel(), *check_tensor(weight))]

    assert rows[0].underflow == 10
    assert summarize_ranges(rows).problems == ()
    assert summarize_ranges(rows, underflow_share=0.0).problems == tuple(rows)
    assert format_range_table(rows).endswith("0 beyond fp16 max, 10 below smallest normal")


@pytest.mark.parametrize(
    "value, overflow, underflow",
    [
        pytest.param(65504.0, 0, 0, id="fp16-max"),
        pytest.param(65519.0, 0, 0, id="rounds-down-to-max"),
        pytest.param(65520.0, 1, 0, id="rounds-to-inf"),
        pytest.param(-1e6, 1, 0, id="negative-overflow"),
        pytest.param(float("inf"), 0, 0, id="already-inf"),
        pytest.param(float("nan"), 0, 0, id="nan"),
        pytest.param(2.0 ** -14, 0, 0, id="smallest-normal"),
        pytest.param(2.0 ** -15, 0, 1, id="subnormal"),
        pytest.param(1e-10, 0, 1, id="flush-to-zero"),
        pytest.param(0.0, 0, 0, id="zero"),
    ],
)
def test_check_tensor_follows_the_cast(value, overflow, underflow):
    got = check_tensor(torch.tensor([value], dtype=torch.float32), torch.float16)
    assert got[:2] == (overflow, underflow)


def test_all_zero_and_empty_tensors():
    assert check_tensor(torch.zeros(3)) == (0, 0, 0.0, None)
    assert check_tensor(torch.zeros(0)) == (0, 0, 0.0, None)


def hand_built_graph() -> fx.GraphModule:
    """x * scale + offset, with an int64 index constant and an unused constant."""
    root = nn.Module()
    root.register_buffer("scale", torch.tensor([1e5, 2.0]))
    root.register_buffer("offset", torch.tensor([3.0, 4.0]))
    root.register_buffer("index", torch.tensor([1, 0]))
    root.register_buffer("dead", torch.tensor([1e9]))
    graph = fx.Graph()
    x = graph.placeholder("x")
    scale, offset = graph.get_attr("scale"), graph.get_attr("offset")
    index = graph.get_attr("index")
    graph.get_attr("dead")
    y = graph.call_function(torch.ops.aten.mul.Tensor, (x, scale))
    y = graph.call_function(torch.ops.aten.add.Tensor, (y, offset))
    y = graph.call_function(torch.ops.aten.index_select.default, (y, 0, index))
    graph.output(y)
    return fx.GraphModule(root, graph)


def node_name(gm: fx.GraphModule, target) -> str:
    (node,) = [n for n in gm.graph.nodes if n.target == target]
    return node.name


def test_every_used_floating_constant_is_checked():
    gm = hand_built_graph()

    rows = weight_range_report(gm)

    by_tensor = {r.tensor: r for r in rows}
    assert sorted(by_tensor) == ["offset", "scale"], "int constants and unused constants are skipped"
    assert (by_tensor["scale"].node, by_tensor["scale"].overflow) == (node_name(gm, torch.ops.aten.mul.Tensor), 1)
    assert (by_tensor["offset"].node, by_tensor["offset"].overflow) == (node_name(gm, torch.ops.aten.add.Tensor), 0)


def test_shared_constant_reported_once_on_first_consumer():
    root = nn.Module()
    root.register_buffer("w", torch.ones(2))
    graph = fx.Graph()
    x = graph.placeholder("x")
    w = graph.get_attr("w")
    late = graph.call_function(operator.mul, (x, 2.0))
    first = graph.call_function(torch.ops.aten.add.Tensor, (x, w))
    second = graph.call_function(torch.ops.aten.mul.Tensor, (late, w))
    graph.output((first, second))

    rows = weight_range_report(fx.GraphModule(root, graph))
    assert [(r.tensor, r.node) for r in rows] == [("w", first.name)]


def test_table_lists_only_problem_rows():
    gm = hand_built_graph()
    text = format_range_table(weight_range_report(gm))

    lines = text.splitlines()
    assert len(lines) == 3, text  # header, the scale row, the summary line
    assert lines[1].split()[:5] == [node_name(gm, torch.ops.aten.mul.Tensor), "scale", "2", "1", "0"]
    assert lines[-1] == "fp16 range: 2 tensors, 4 values checked: 1 beyond fp16 max, 0 below smallest normal"


def test_table_limit():
    rows = [LayerRange(f"n{i}", f"t{i}", 1, 1, 0, 1e6, 1e6) for i in range(5)]
    text = format_range_table(rows, limit=2)
    assert "... and 3 more tensors with problems" in text
    assert text.splitlines()[-1].startswith("fp16 range: 5 tensors, 5 values checked: 5 beyond fp16 max")


def test_bf16_summary_label():
    gm = hand_built_graph()
    line = format_range_table(weight_range_report(gm, torch.bfloat16))
    assert line == "bf16 range: 2 tensors, 4 values checked: 0 beyond bf16 max, 0 below smallest normal"


def test_mixed_dtypes_are_refused():
    rows = [
        LayerRange("a", "a", 1, 0, 0, 1.0, 1.0, torch.float16),
        LayerRange("b", "b", 1, 0, 0, 1.0, 1.0, torch.bfloat16),
    ]
    with pytest.raises(ValueError, match="different dtypes"):
        summarize_ranges(rows)
    with pytest.raises(ValueError, match="not torch.bfloat16"):
        summarize_ranges(rows[:1], torch.bfloat16)


@pytest.mark.parametrize("dtype", [pytest.param(torch.int8, id="int8"), pytest.param("float16", id="string")])
def test_non_floating_target_is_refused(dtype):
    with pytest.raises(ValueError, match="floating-point"):
        weight_range_report(hand_built_graph(), dtype)
