"""sensitivity: one layer at a time finds the layers around an injected wide channel; the fallback plan
leaves only those in float and meets the target on held-out feeds; a benign net keeps everything int8.

The outlier net (``int8_fixtures``) is exact in float, so what INT8 loses is the quantization alone.
Its target is 40 dB rather than the default 20: a random-weight net's logits are mostly bias, which
keeps its output SNR high (the benign net scores 48 dB in the CPU format, the outlier net 33).
"""

from __future__ import annotations

import onnx
import pytest
from int8_fixtures import needs_modelopt

from repfx.int8.metrics import Scores, Target
from repfx.int8.sensitivity import (fallback_candidates, feeding_layers, improves, layer_sensitivity, plan_fallback,
                                    weighted_layers)

TARGET = Target(agreement=0.99, snr_db=40.0)
AROUND_THE_WIDE_CHANNEL = {"node_conv2d_1", "node_conv2d_2"}  # its producer and its consumer


def test_weighted_layers_are_the_convs_and_the_linear(small_onnx):
    assert weighted_layers(onnx.load(str(small_onnx))) == [
        "node_conv2d", "node_conv2d_1", "node_conv2d_2", "node_conv2d_3", "node_linear"]


def test_sensitivity_ranks_the_layers_around_the_wide_channel_first(outlier_onnx, calibration, held_out):
    ranked = layer_sensitivity(outlier_onnx, calibration, held_out, "cpu")
    assert {result.name for result in ranked} == set(weighted_layers(onnx.load(str(outlier_onnx))))
    assert ranked[0].name in AROUND_THE_WIDE_CHANNEL
    assert ranked[0].scores.worst_snr_db < ranked[-1].scores.worst_snr_db - 20


def test_fallback_leaves_the_few_sensitive_layers_float_and_meets_the_target(outlier_onnx, calibration, held_out):
    plan = plan_fallback(outlier_onnx, calibration, held_out, "cpu", target=TARGET)
    assert not plan.plain.meets(TARGET) and plan.met_target and plan.final.meets(TARGET)
    floated = [name for name, _ in plan.float_layers]
    assert 1 <= len(floated) <= 2 and set(floated) <= AROUND_THE_WIDE_CHANNEL
    assert all("alone in int8 it gives" in why for _, why in plan.float_layers)
    model = onnx.load_from_string(plan.model)
    producer = {output: node.op_type for node in model.graph.node for output in node.output}
    layers = weighted_layers(onnx.load(str(outlier_onnx)))
    weight_from = {node.name: producer.get(node.input[1], "initializer") for node in model.graph.node
                   if node.name in layers}
    assert all(weight_from[name] == "initializer" for name in floated)
    assert sum(source == "DequantizeLinear" for source in weight_from.values()) == 5 - len(floated)


def test_a_net_that_meets_the_target_keeps_every_layer_int8(small_onnx, calibration, held_out):
    plan = plan_fallback(small_onnx, calibration, held_out, "cpu", target=TARGET)
    assert plan.float_layers == () and plan.met_target and plan.final == plan.plain
    assert len(plan.sensitivity) == 5


@needs_modelopt
@pytest.mark.slow
def test_tensorrt_fallback_floats_the_consumer_of_the_wide_channel(outlier_onnx, calibration, held_out):
    """ModelOpt puts Q/DQ on the inputs of the ops it quantizes: the consumer alone carries the wide tensor."""
    plan = plan_fallback(outlier_onnx, calibration, held_out, "tensorrt", target=TARGET)
    assert [name for name, _ in plan.float_layers] == ["node_conv2d_2"]
    assert not plan.plain.meets(TARGET) and plan.met_target


@pytest.mark.parametrize("new, old, expected", [
    (Scores((30.0,), (0.99,)), Scores((40.0,), (0.98,)), True),
    (Scores((40.0,), (0.97,)), Scores((20.0,), (0.98,)), False),
    (Scores((20.4,), (None,)), Scores((20.0,), (None,)), False),
    (Scores((20.5,), (None,)), Scores((20.0,), (None,)), True),
], ids=["agreement-up", "agreement-down", "snr-up-too-little", "snr-up-enough"])
def test_improvement_is_agreement_first_then_enough_snr(new, old, expected):
    assert improves(new, old, min_gain_db=0.5) is expected


def test_the_fallback_tries_sensitive_layers_with_the_layers_that_feed_them(small_onnx):
    """Floating a layer alone can leave its input in INT8 (ONNX Runtime's format quantizes a tensor while its
    producer's side is INT8): each prefix of the ranking is also tried with its feeding layers, fewest first."""
    model = onnx.load(str(small_onnx))
    assert feeding_layers(model, "node_conv2d_1") == ["node_conv2d"]  # through its ReLU
    assert feeding_layers(model, "node_conv2d") == []  # reads the input
    ranked = ["node_conv2d_2", "node_conv2d", "node_conv2d_1", "node_conv2d_3"]
    assert fallback_candidates(model, ranked, limit=2) == [
        ("node_conv2d_2",), ("node_conv2d_1", "node_conv2d_2"), ("node_conv2d_2", "node_conv2d")]
