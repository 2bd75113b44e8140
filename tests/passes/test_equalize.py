"""Cross-layer equalization: exact (float64 and float32), same ops, ranges balanced, refusals with reasons.

Each ``before`` graph is built with ``GraphBuilder`` (seeded weights); one channel of
the first layer's output is given a wide range on purpose (times 50), as a folded
identity branch would, so that there is something to balance.
"""

from __future__ import annotations

import pytest
import torch

from repfx.passes.algebra import equalization as eq
from repfx.passes.equalize import PROOF_RTOL, equalize, find_pairs
from pass_graphs import GraphBuilder, assert_same_values, op_counts, sample_inputs, structure

aten = torch.ops.aten


def widen(gm: torch.fx.GraphModule, target: str, channel: int = 0, by: float = 50.0) -> torch.fx.GraphModule:
    getattr(gm, target)[channel] *= by
    return gm


def conv_act_conv(act=aten.relu.default, *act_args, groups: int = 1, second_groups: int = 1, padding: int = 1,
                  bias: bool = True, channels: int = 8) -> torch.fx.GraphModule:
    g = GraphBuilder()
    y = g.conv(g.input("x", 2, channels, 8, 8), channels, 3, padding=1, groups=groups, bias=bias)
    if act is not None:
        y = g.call(act, y, *act_args)
    out = g.conv(y, 6 if second_groups == 1 else channels, 3, padding=padding, groups=second_groups, bias=True)
    return widen(g.build(out), "weight_0")


def prelu(per_channel: bool) -> torch.fx.GraphModule:
    g = GraphBuilder()
    y = g.conv(g.input("x", 2, 4, 8, 8), 8, 3, padding=1, bias=True)
    y = g.call(aten.prelu.default, y, g.constant(torch.full((8,) if per_channel else (1,), 0.2)
                                                 + torch.arange(8 if per_channel else 1) * 0.05))
    return widen(g.build(g.conv(y, 6, 1, bias=True)), "weight_0")


def linear_pair() -> torch.fx.GraphModule:
    g = GraphBuilder()
    y = g.call(aten.linear.default, g.input("x", 4, 10), g.randn(12, 10), g.randn(12, name="bias"))
    y = g.call(aten.relu.default, y)
    return widen(g.build(g.call(aten.linear.default, y, g.randn(5, 12), g.randn(5, name="bias"))), "weight_0")


def chain_of_three() -> torch.fx.GraphModule:
    g = GraphBuilder()
    y = g.call(aten.relu_.default, g.conv(g.input("x", 2, 4, 8, 8), 8, 3, padding=1, bias=True))
    y = g.call(aten.leaky_relu.default, g.conv(y, 8, 3, padding=1, bias=True), 0.1)
    return widen(g.build(g.conv(y, 4, 1, bias=True)), "weight_0")


CASES = {
    "relu": (conv_act_conv, 1),
    "inplace-relu-no-first-bias": (lambda: conv_act_conv(aten.relu_.default, bias=False), 1),
    "leaky-relu": (lambda: conv_act_conv(aten.leaky_relu.default, 0.1), 1),
    "grouped-first": (lambda: conv_act_conv(groups=2), 1),
    "grouped-second": (lambda: conv_act_conv(second_groups=4), 1),
    "depthwise-second": (lambda: conv_act_conv(second_groups=8), 1),
    "prelu-scalar": (lambda: prelu(False), 1),
    "prelu-per-channel": (lambda: prelu(True), 1),
    "identity-padded": (lambda: conv_act_conv(None), 1),
    "linear": (linear_pair, 1),
    "chain-of-three": (chain_of_three, 2),
}


@pytest.mark.parametrize("case", CASES)
def test_equalization_is_exact_keeps_the_ops_and_balances_ranges(case):
    factory, pairs = CASES[case]
    before = factory()
    written, state = structure(before), {k: v.clone() for k, v in before.state_dict().items()}
    result = equalize(before, [sample_inputs(before, seed) for seed in (1, 2)])
    assert len(result.pairs) == pairs and not result.refusals
    assert result.worst_relative_error <= PROOF_RTOL
    assert structure(result.graph) == written and op_counts(result.graph) == op_counts(before)
    assert_same_values(before, result.graph, seeds=(3, 4))  # float32, fresh inputs, relative to |y|
    assert structure(before) == written and all(torch.equal(before.state_dict()[k], v) for k, v in state.items())
    # the widest layer narrows (a layer between two pairs may take on some of its neighbours' spread)
    assert max(p.spread(after=True) for p in result.pairs) < max(p.spread(after=False) for p in result.pairs)
    if pairs == 1:  # one pair converges in one step: both layers' ranges meet at sqrt(r1 * r2)
        pair = result.pairs[0]
        assert torch.allclose(torch.tensor(pair.first_after), torch.tensor(pair.second_after), rtol=1e-5)
        geometric = (torch.tensor(pair.first_before) * torch.tensor(pair.second_before)).sqrt()
        assert torch.allclose(torch.tensor(pair.first_after), geometric, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_a_second_run_barely_moves_the_ranges(case):
    first = equalize(CASES[case][0](), [sample_inputs(CASES[case][0]())])
    again = equalize(first.graph, [sample_inputs(first.graph)])
    for pair in again.pairs:
        before, after = torch.tensor(pair.first_before), torch.tensor(pair.first_after)
        assert torch.allclose(before, after, rtol=1e-2), (before, after)
    assert again.rounds <= 2


def test_bias_absorbs_where_exact_no_activation_and_no_padding():
    before = conv_act_conv(None, padding=0)
    result = equalize(before, [sample_inputs(before)])
    (pair,) = result.pairs
    assert pair.bias_absorbed and pair.activation == "identity"
    first_bias = result.graph.get_submodule("").get_buffer("bias_1")
    assert torch.equal(first_bias, torch.zeros_like(first_bias))
    assert_same_values(before, result.graph, seeds=(3,))


def test_bias_is_not_absorbed_after_a_relu_or_into_a_padded_layer():
    for before in (conv_act_conv(), conv_act_conv(None, padding=1)):
        (pair,) = equalize(before, [sample_inputs(before)]).pairs
        assert not pair.bias_absorbed


def test_absorbing_creates_the_second_bias_when_it_has_none():
    g = GraphBuilder()
    y = g.conv(g.input("x", 2, 4, 6, 6), 8, 3, bias=True)
    before = widen(g.build(g.conv(y, 5, 1)), "weight_0")
    result = equalize(before, [sample_inputs(before)])
    assert result.pairs[0].bias_absorbed
    assert len(list(result.graph.buffers())) == len(list(before.buffers())) + 1
    assert_same_values(before, result.graph, seeds=(3,))


def two_users() -> torch.fx.GraphModule:
    g = GraphBuilder()
    y = g.call(aten.relu.default, g.conv(g.input("x", 2, 4, 8, 8), 8, 3, padding=1))
    return g.build(g.conv(y, 4, 1), y)


def shared_weight() -> torch.fx.GraphModule:
    g = GraphBuilder()
    x = g.input("x", 2, 4, 8, 8)
    weight = g.randn(4, 4, 3, 3)
    y = g.call(aten.relu.default, g.call(aten.conv2d.default, x, weight, None, [1, 1], [1, 1]))
    return g.build(g.call(aten.conv2d.default, y, weight, None, [1, 1], [1, 1]))


@pytest.mark.parametrize("factory, code, says", [
    (lambda: conv_act_conv(aten.hardtanh.default, 0.0, 6.0), "not-homogeneous", "hardtanh between them clips"),
    (lambda: conv_act_conv(aten.gelu.default), "not-homogeneous", "gelu between them is not positively homogeneous"),
    (lambda: conv_act_conv(aten.sigmoid.default), "not-homogeneous", "sigmoid"),
    (two_users, "shared-output", "relu is read by 2 ops"),
    (shared_weight, "shared-weight", "is read 2 times"),
], ids=["relu6", "gelu", "sigmoid", "two-users", "shared-weight"])
def test_must_not_equalize(factory, code, says):
    before = factory()
    written = structure(before)
    result = equalize(before, [sample_inputs(before)])
    assert not result.pairs and not result.modified
    (refusal,) = result.refusals
    assert refusal.code == code and says in refusal.reason, refusal
    assert structure(result.graph) == written
    assert_same_values(before, result.graph, seeds=(3,))


def test_a_sum_between_is_no_pair_and_no_refusal():
    g = GraphBuilder()
    x = g.input("x", 2, 4, 8, 8)
    y = g.call(aten.add.Tensor, g.conv(x, 4, 3, padding=1), x)
    assert find_pairs(g.build(g.conv(y, 4, 1))) == ([], [])


def test_a_wrong_proof_undoes_everything(monkeypatch):
    monkeypatch.setattr(eq, "scale_inputs", lambda weight, scales, groups: weight)  # forget the second layer
    before = conv_act_conv()
    result = equalize(before, [sample_inputs(before)])
    assert not result.pairs and result.refusals[0].code == "local-proof"
    assert structure(result.graph) == structure(before)
    assert all(torch.equal(a, b) for a, b in zip(result.graph.state_dict().values(), before.state_dict().values()))


def test_a_dead_channel_keeps_scale_one():
    scales = eq.equalizing_scales(torch.tensor([4.0, 0.0, 1.0]), torch.tensor([1.0, 2.0, 0.0]))
    assert scales.tolist() == [2.0, 1.0, 1.0]


def test_input_ranges_follow_groups():
    weight = torch.arange(4 * 2 * 1 * 1, dtype=torch.float64).reshape(4, 2, 1, 1)  # 2 groups: in 4, out 4
    # group 0 (outputs 0, 1) reads inputs 0, 1; group 1 (outputs 2, 3) reads inputs 2, 3
    assert eq.input_ranges(weight, 2).tolist() == [2.0, 3.0, 6.0, 7.0]
    scaled = eq.scale_inputs(weight, torch.tensor([1.0, 10.0, 100.0, 1000.0], dtype=torch.float64), 2)
    assert scaled.reshape(4, 2).tolist() == [[0, 10], [2, 30], [400, 5000], [600, 7000]]


def test_the_plain_graph_of_a_repvgg_net_equalizes_exactly():
    from repfx import samples
    import repfx
    from repfx.samples.repvgg import RepVGGBlock

    torch.manual_seed(0)
    model = torch.nn.Sequential(RepVGGBlock(3, 8, stride=2), RepVGGBlock(8, 8), RepVGGBlock(8, 8)).eval()
    samples.randomize_bn_(model, 0)
    model[2].identity.weight.data[:2] = 200.0  # a folded identity branch with a huge BN scale
    x = torch.randn(2, 3, 16, 16)
    plain = repfx.reparameterize(model, (x,), cost="always")
    result = equalize(plain, [(x,)])
    assert [pair.activation for pair in result.pairs] == ["relu", "relu"]
    wide = result.pairs[1]  # the identity taps of 200 are input channels 0 and 1 of its second layer
    assert max(wide.second_after) < max(wide.second_before) / 4
    with torch.no_grad():
        want, got = model(x), result.graph(x)
    assert (want - got).abs().max() <= 1e-4 * max(1.0, want.abs().max())
