"""The cost rules (``passes/cost``): work per op, the roofline on hand-computed examples, and how rules decide.

Numbers here are worked by hand from the formulas in ``passes/cost/profile.py``:
``time = max(2 * MACs * batch / rate, bytes / bandwidth) + overhead`` with bytes =
(activations read + written) * batch * itemsize + weights * itemsize, and a conv
at least ``conv_output_s`` per output element. Profiles are
made up, so nothing depends on the machine running the tests.
"""

from __future__ import annotations

import math

import pytest
import torch

from repfx.passes.algebra.forms import ConvForm
from repfx.passes.cost import (AlwaysMerge, DeviceProfile, LatencyCost, MacsCost, MeasuredCost, Work, elementwise,
                               of_form, resolve, roofline_seconds)

SLOW = DeviceProfile("slow", "cpu", {"float32": 1e9, "float16": 4e9}, bandwidth=1e9, overhead_s=1e-5)


def conv(cin: int, cout: int, k: int, groups: int = 1, stride: int = 1) -> ConvForm:
    weight = torch.ones(cout, cin // groups, k, k, dtype=torch.float64)
    return ConvForm.convolution(weight, torch.zeros(cout, dtype=torch.float64), (stride, stride), (k // 2, k // 2),
                                (1, 1), groups)


def test_work_of_a_conv_counts_macs_activations_and_weights():
    (op,) = of_form(conv(16, 16, 3), (16, 8, 8)).ops
    assert (op.kind, op.macs, op.reads, op.writes, op.params) == ("conv", 16 * 8 * 8 * 16 * 9, 1024, 1024, 2320)
    (strided,) = of_form(conv(16, 32, 3, stride=2), (32, 4, 4)).ops
    assert strided.reads == 16 * 7 * 7 and strided.layout.in_shape == (16, 7, 7)  # the smallest input giving 4x4


def test_identity_is_free_and_a_lone_scale_is_elementwise():
    assert of_form(ConvForm.identity(8, 2), (8, 4, 4)).ops == ()
    scale = ConvForm.affine(torch.full((8,), 2.0, dtype=torch.float64), torch.ones(8, dtype=torch.float64), 2)
    (op,) = of_form(scale, (8, 4, 4)).ops
    assert (op.kind, op.macs, op.reads, op.writes) == ("elementwise", 128, 128, 128)


def test_works_add_up_and_keep_the_macs_the_old_rule_counted():
    three = of_form(conv(16, 16, 3), (16, 8, 8))
    one = of_form(conv(16, 16, 1), (16, 8, 8))
    apart = three + one + elementwise((16, 8, 8))
    assert len(apart.ops) == 3 and apart.macs == 147456 + 16384 + 1024
    assert sum([three, one]).macs == three.macs + one.macs and (2 * one).macs == 2 * one.macs


def test_roofline_of_a_compute_bound_conv():
    (op,) = of_form(conv(16, 16, 3), (16, 8, 8)).ops
    compute = 2 * 147456 * 2 / 1e9
    traffic = ((1024 + 1024) * 2 + 2320) * 4 / 1e9
    assert compute > traffic
    assert math.isclose(roofline_seconds(op, SLOW, 2, "float32"), compute + 1e-5, rel_tol=1e-12)


def test_roofline_of_a_memory_bound_add_and_its_dtype():
    (op,) = elementwise((16, 8, 8)).ops
    fp32 = 3 * 1024 * 2 * 4 / 1e9
    assert math.isclose(roofline_seconds(op, SLOW, 2, "float32"), fp32 + 1e-5, rel_tol=1e-12)
    assert math.isclose(roofline_seconds(op, SLOW, 2, "float16"), fp32 / 2 + 1e-5, rel_tol=1e-12)


def test_a_depthwise_conv_is_held_to_the_per_output_floor_and_an_add_is_not():
    """dw3x3 on 16x8x8 at batch 2: 18,432 MACs (37 us at 1 GFLOP/s), but 2,048 outputs at 50 ns each: 102 us."""
    floored = DeviceProfile("floored", "cpu", {"float32": 1e9}, bandwidth=1e9, overhead_s=1e-5, conv_output_s=5e-8)
    (op,) = of_form(conv(16, 16, 3, groups=16), (16, 8, 8)).ops
    assert 2 * op.macs * 2 / 1e9 < 2048 * 5e-8
    assert math.isclose(roofline_seconds(op, floored, 2, "float32"), 2048 * 5e-8 + 1e-5, rel_tol=1e-12)
    (add,) = elementwise((16, 8, 8)).ops
    assert roofline_seconds(add, floored, 2, "float32") == roofline_seconds(add, SLOW, 2, "float32")
    (dense,) = of_form(conv(16, 16, 3), (16, 8, 8)).ops  # 147,456 MACs: compute-bound above the floor
    assert roofline_seconds(dense, floored, 2, "float32") == roofline_seconds(dense, SLOW, 2, "float32")


def test_a_dtype_the_profile_lacks_runs_at_the_float32_rate():
    (op,) = of_form(conv(16, 16, 3), (16, 8, 8)).ops
    assert roofline_seconds(op, SLOW, 2, "bfloat16") == roofline_seconds(op, SLOW, 2, "float32")


# -- decisions -------------------------------------------------------------------------

def contested() -> tuple[Work, Work]:
    """cat(3x3, 1x1) 8 -> 4 + 4: merged, one 3x3 8 -> 8 (more MACs); apart, two convs and a copy."""
    merged = of_form(conv(8, 8, 3), (8, 16, 16))
    apart = of_form(conv(8, 4, 3), (4, 16, 16)) + of_form(conv(8, 4, 1), (4, 16, 16)) + elementwise((8, 16, 16), 1)
    assert merged.macs > apart.macs
    return merged, apart


@pytest.mark.parametrize("profile, merges", [
    pytest.param(DeviceProfile("launch-bound", "cpu", {"float32": 1e12}, 1e12, 1e-4), True, id="overhead-bound"),
    pytest.param(DeviceProfile("compute-bound", "cpu", {"float32": 1e8}, 1e12, 1e-9), False, id="compute-bound"),
])
def test_latency_decides_by_the_profile_where_macs_always_refuses(profile, merges):
    merged, apart = contested()
    assert not MacsCost().pays(merged, apart).won
    verdict = LatencyCost(profile=profile, batch=2).pays(merged, apart, "cat")
    assert verdict.won is merges
    decision = verdict.decision
    assert (decision.where, decision.merged_won, decision.how, decision.unit) == ("cat", merges, "modeled", "s")
    assert decision.merged.startswith("3x3 8->8") and "1x1 8->4" in decision.apart


def test_batch_moves_the_boundary():
    merged, apart = contested()
    gpu = DeviceProfile("gpu", "cuda", {"float32": 1e11}, 1e11, 5e-6)
    assert LatencyCost(profile=gpu, batch=1).pays(merged, apart).won
    assert not LatencyCost(profile=gpu, batch=512).pays(merged, apart).won


def test_uncontested_merges_are_not_noted():
    three, one = of_form(conv(8, 8, 3), (8, 16, 16)), of_form(conv(8, 8, 1), (8, 16, 16))
    rule = LatencyCost(profile=SLOW)
    verdict = rule.pays(three, three + one + elementwise((8, 16, 16)), "add")
    assert verdict.won and verdict.decision is None


def test_measure_times_only_contested_pairs_and_follows_the_timer():
    merged, apart = contested()
    timed = []

    def timer(first: Work, second: Work) -> tuple[float, float]:
        timed.extend([first, second])
        return (1.0, 2.0) if first is merged else (2.0, 1.0)

    rule = MeasuredCost(profile=SLOW, timer=timer)
    verdict = rule.pays(merged, apart, "cat")
    assert verdict.won and timed == [merged, apart]
    assert verdict.decision.how == "measured"
    timed.clear()
    three = of_form(conv(8, 8, 3), (8, 16, 16))
    rule.pays(three, three + three, "add")
    assert timed == []  # fewer MACs merged: no device decides otherwise, nothing is timed
    slower = MeasuredCost(profile=SLOW, timer=lambda first, second: (2.0, 1.0))
    assert not slower.pays(merged, apart, "cat").won


def test_always_merges_and_resolve_names_only_rules_without_a_device():
    merged, apart = contested()
    assert AlwaysMerge().pays(merged, apart).won and AlwaysMerge().merges_everything
    assert isinstance(resolve("macs"), MacsCost) and isinstance(resolve("always"), AlwaysMerge)
    rule = LatencyCost(profile=SLOW)
    assert resolve(rule) is rule
    with pytest.raises(ValueError, match="need a device"):
        resolve("latency")


def test_a_latency_rule_needs_a_profile_and_a_positive_batch():
    with pytest.raises(TypeError, match="DeviceProfile"):
        LatencyCost()
    with pytest.raises(ValueError, match="batch"):
        LatencyCost(profile=SLOW, batch=0)


def test_profile_round_trips_and_refuses_bad_numbers():
    assert DeviceProfile.from_dict(SLOW.to_dict()) == SLOW
    measured = DeviceProfile("m", "cpu", {"float32": 1e9}, 2e9, 3e-6, "measured", conv_output_s=4e-10, busy=True)
    again = DeviceProfile.from_dict(measured.to_dict())
    assert again == measured and (again.conv_output_s, again.busy) == (4e-10, True)  # each field to its own
    older = {key: value for key, value in SLOW.to_dict().items() if key != "conv_output_s"}
    assert DeviceProfile.from_dict(older).conv_output_s == 0.0  # a profile written without the floor has none
    for field, value in (("bandwidth", -1), ("overhead_s", "nan"), ("flops", {"float16": 1e9}),
                         ("conv_output_s", -1e-9)):
        with pytest.raises(ValueError):
            DeviceProfile.from_dict(SLOW.to_dict() | {field: value})
