"""qdq_check: a ModelOpt file passes; ONNX Runtime's CPU format and hand-made violations fail, each rule named.

The hand-made model is the smallest QDQ convolution TensorRT accepts: x -> Q -> DQ -> Conv with a
per-channel int8 weight (Q -> DQ on a float weight, axis 0) and a float bias. Each case breaks one rule.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from int8_fixtures import needs_modelopt
from onnx import TensorProto, helper, numpy_helper

from repfx.int8.qdq_check import check_tensorrt_qdq
from repfx.int8.quantizers import quantize

CHANNELS = 4


def qdq_conv(*, activation_zero_point=0, zero_point_type=np.int8, weight_scales=CHANNELS, weight_axis=0,
             weight_scale=None, skip_activation_dq=False, int_bias=False, activation_scales=1) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(CHANNELS, 3, 3, 3)).astype(np.float32)
    channel_max = np.abs(weight).reshape(CHANNELS, -1).max(axis=1)
    scale = (channel_max / 127).astype(np.float32) if weight_scale is None else weight_scale
    if weight_scales == 1:
        scale = np.array(scale.max(), np.float32)
    activation_scale = np.full(activation_scales, 0.05, np.float32) if activation_scales > 1 else np.array(
        0.05, np.float32)
    initializers = [
        numpy_helper.from_array(weight, "w"), numpy_helper.from_array(scale, "w_scale"),
        numpy_helper.from_array(np.zeros(scale.shape, np.int8), "w_zero"),
        numpy_helper.from_array(activation_scale, "x_scale"),
        numpy_helper.from_array(np.full(activation_scale.shape, activation_zero_point, zero_point_type), "x_zero"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["xq"], name="x_q"),
        helper.make_node("QuantizeLinear", ["w", "w_scale", "w_zero"], ["wq"], name="w_q", axis=weight_axis),
        helper.make_node("DequantizeLinear", ["wq", "w_scale", "w_zero"], ["wd"], name="w_dq", axis=weight_axis),
    ]
    if skip_activation_dq:
        conv_input = "xq"
    else:
        nodes.append(helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xd"], name="x_dq"))
        conv_input = "xd"
    if int_bias:
        initializers += [numpy_helper.from_array(np.arange(CHANNELS, dtype=np.int32), "b_int"),
                         numpy_helper.from_array(scale * 0.05, "b_scale")]
        nodes.append(helper.make_node("DequantizeLinear", ["b_int", "b_scale"], ["b"], name="b_dq"))
    else:
        initializers.append(numpy_helper.from_array(np.zeros(CHANNELS, np.float32), "b"))
    nodes.append(helper.make_node("Conv", [conv_input, "wd", "b"], ["y"], name="conv", pads=[1, 1, 1, 1]))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, CHANNELS, 8, 8])]
    graph = helper.make_graph(nodes, "qdq_conv", inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def test_the_hand_made_model_is_valid_and_passes():
    model = qdq_conv()
    onnx.checker.check_model(model)
    assert check_tensorrt_qdq(model) == []


@pytest.mark.parametrize("variant, problem", [
    ({"activation_zero_point": 3}, "x_q: zero point 3; TensorRT's int8 is symmetric"),
    ({"zero_point_type": np.uint8}, "x_q: the zero point is uint8"),
    ({"weight_scales": 1}, "w_q (weight of conv): weights are quantized with 1 scale(s)"),
    ({"weight_axis": 1, "weight_scales": CHANNELS}, "per-channel on axis 0"),
    ({"weight_scale": np.full(CHANNELS, 1e-3, np.float32)}, "quantized weights reach"),
    ({"skip_activation_dq": True}, "x_q: QuantizeLinear feeds Conv"),
    ({"int_bias": True}, "conv: the bias is quantized to integers"),
    ({"activation_scales": 3}, "x_q: an activation is quantized per channel"),
], ids=["nonzero-zero-point", "uint8", "per-tensor-weight", "weight-axis-1", "weights-beyond-127", "q-without-dq",
        "int32-bias", "per-channel-activation"])
def test_each_violation_is_named(variant, problem):
    problems = check_tensorrt_qdq(qdq_conv(**variant))
    assert any(problem in line for line in problems), problems


def test_onnxruntime_cpu_format_breaks_the_rules(small_onnx, calibration):
    problems = check_tensorrt_qdq(onnx.load_from_string(quantize(small_onnx, calibration, "cpu")))
    assert any("the zero point is uint8" in line for line in problems)
    assert any("the bias is quantized to integers" in line for line in problems)


@needs_modelopt
@pytest.mark.slow
def test_a_modelopt_file_passes(outlier_onnx, calibration):
    """The outlier net: its widest channel's weights sit exactly at the per-channel maximum (127)."""
    model = onnx.load_from_string(quantize(outlier_onnx, calibration, "tensorrt"))
    assert any(node.op_type == "QuantizeLinear" for node in model.graph.node)
    assert check_tensorrt_qdq(model) == []
