"""A static check that a QDQ ONNX model follows TensorRT's explicit-quantization rules for int8.

TensorRT reads Q/DQ nodes as the precision contract (explicit quantization) and rejects, or silently
runs in float, what breaks its rules; a file that ONNX Runtime runs happily can still fail the engine
build on a machine we do not have here. So the rules are checked on the file itself:

- int8 is symmetric: every zero point is an int8 zero (uint8 or a non-zero point is not accepted);
- scales are positive and finite; activations are quantized per tensor (a scalar scale);
- a weighted op's weight (Conv, ConvTranspose, Gemm, MatMul reading a constant) is quantized per output
  channel, on axis 0 of Conv/Gemm weights (the axis that indexes output channels in general), and its
  quantized values lie in [-127, 127] (TensorRT's int8 weight range: -128 has no positive twin);
- every QuantizeLinear feeds only DequantizeLinear nodes (a Q->DQ pair), never an op or a graph output;
- biases stay float (no int32 bias quantization: TensorRT fuses the float bias itself).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper

from repfx.int8.quantizers import WEIGHTED, constant_names

QDQ = ("QuantizeLinear", "DequantizeLinear")
INT8_RANGE = (-127, 127)
BIASED = ("Conv", "ConvTranspose", "Gemm")


def check_tensorrt_qdq(model: onnx.ModelProto) -> list[str]:
    """Every way ``model`` breaks TensorRT's int8 explicit-quantization rules, one line each (empty: none)."""
    constants = _constants(model)
    producer = {output: node for node in model.graph.node for output in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            consumers[name].append(node)
    graph_outputs = {value.name for value in model.graph.output}
    weights = _weight_dequantizers(model, producer)
    biases = {producer[node.input[2]].name for node in model.graph.node if node.op_type in BIASED
              and len(node.input) > 2 and node.input[2] in producer}  # reported once, at their op
    problems: list[str] = []
    for node in model.graph.node:
        if node.op_type in QDQ and node.name not in biases:
            problems += _scale_and_zero_point(node, constants, is_weight=node.name in weights)
        if node.op_type == "QuantizeLinear":
            users = consumers[node.output[0]]
            if node.output[0] in graph_outputs or not users or any(u.op_type != "DequantizeLinear" for u in users):
                kinds = sorted({u.op_type for u in users}) + (["a graph output"] if node.output[0] in graph_outputs
                                                               else [])
                problems.append(f"{node.name}: QuantizeLinear feeds {', '.join(kinds) or 'nothing'}; "
                                "TensorRT needs every Q followed by a DequantizeLinear")
        if node.op_type in BIASED and len(node.input) > 2 and node.input[2]:
            bias = producer.get(node.input[2])
            if (bias is not None and bias.op_type == "DequantizeLinear") or _is_integer(constants.get(node.input[2])):
                problems.append(f"{node.name}: the bias is quantized to integers; TensorRT takes a float bias")
    for name, (dequantize, layer, axis) in weights.items():
        problems += _weight_rules(dequantize, layer, axis, constants)
    return problems


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers and Constant-node values by name."""
    values = {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attribute.t)
    return values


def _is_integer(value: np.ndarray | None) -> bool:
    return value is not None and np.issubdtype(value.dtype, np.integer)


def _output_channel_axis(layer: onnx.NodeProto, rank: int) -> int:
    """The weight axis that indexes output channels: 0 for Conv and Gemm (transB=1, how exporters write it)."""
    if layer.op_type == "ConvTranspose":
        return 1
    if layer.op_type == "Gemm":
        trans_b = next((a.i for a in layer.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if layer.op_type == "MatMul":
        return rank - 1
    return 0


def _weight_dequantizers(model: onnx.ModelProto, producer: dict) -> dict[str, tuple]:
    """DequantizeLinear nodes that feed a weighted op's weight input: name -> (DQ node, op, expected axis)."""
    constants = constant_names(model)
    found = {}
    for layer in model.graph.node:
        if layer.op_type not in WEIGHTED or len(layer.input) < 2:
            continue
        dequantize = producer.get(layer.input[1])
        if dequantize is None or dequantize.op_type != "DequantizeLinear":
            continue  # a float weight: the op runs in float, nothing to check
        source = producer.get(dequantize.input[0])
        quantized_from = source.input[0] if source is not None and source.op_type == "QuantizeLinear" else None
        if dequantize.input[0] not in constants and quantized_from not in constants:
            continue  # an activation on the weight side (attention's MatMul): per-tensor rules apply
        rank = _rank(model, dequantize.input[0] if quantized_from is None else quantized_from)
        found[dequantize.name] = (dequantize, layer, _output_channel_axis(layer, rank))
        if source is not None and source.op_type == "QuantizeLinear":
            found[source.name] = (source, layer, _output_channel_axis(layer, rank))
    return found


def _rank(model: onnx.ModelProto, name: str) -> int:
    for tensor in model.graph.initializer:
        if tensor.name == name:
            return len(tensor.dims)
    return 2


def _axis(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 1)


def _scale_and_zero_point(node: onnx.NodeProto, constants: dict, *, is_weight: bool) -> list[str]:
    problems = []
    scale = constants.get(node.input[1]) if len(node.input) > 1 else None
    if scale is None:
        return [f"{node.name}: the scale is not a constant; TensorRT needs constant scales"]
    if not (np.isfinite(scale).all() and (scale > 0).all()):
        problems.append(f"{node.name}: a scale is zero, negative or not finite")
    if not is_weight and scale.size > 1:
        problems.append(f"{node.name}: an activation is quantized per channel ({scale.size} scales); "
                        "TensorRT quantizes activations per tensor")
    zero_point = constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    output_dtype = next((a.i for a in node.attribute if a.name == "output_dtype"), 0)
    if zero_point is None and output_dtype != onnx.TensorProto.INT8:
        problems.append(f"{node.name}: no int8 zero point (ONNX then means uint8); TensorRT's int8 is symmetric "
                        "int8 with zero point 0")
    elif zero_point is not None and zero_point.dtype != np.int8:
        problems.append(f"{node.name}: the zero point is {zero_point.dtype}; TensorRT takes int8 with zero point 0")
    elif zero_point is not None and np.any(zero_point != 0):
        problems.append(f"{node.name}: zero point {int(zero_point.flat[np.flatnonzero(zero_point)[0]])}; "
                        "TensorRT's int8 is symmetric (zero point 0)")
    return problems


def _weight_rules(node: onnx.NodeProto, layer: onnx.NodeProto, axis: int, constants: dict) -> list[str]:
    """Per-channel on the output-channel axis, and quantized values in [-127, 127]."""
    scale = constants.get(node.input[1])
    if scale is None:
        return []
    weight = constants.get(node.input[0])
    if node.op_type == "DequantizeLinear" and weight is None:
        return []  # DQ of a Q: the values are checked at the Q
    if weight is None:
        return []
    channels = weight.shape[axis] if weight.ndim > axis else 1
    place = f"{node.name} (weight of {layer.name})"
    if scale.size != channels or (scale.size > 1 and _axis(node) % weight.ndim != axis):
        return [f"{place}: weights are quantized with {scale.size} scale(s) on axis {_axis(node)}; TensorRT-style "
                f"int8 is per-channel on axis {axis} ({channels} channels)"]
    shape = [1] * weight.ndim
    shape[axis] = -1
    if node.op_type == "QuantizeLinear":
        values = np.rint(weight.astype(np.float64) / scale.astype(np.float64).reshape(shape))
    else:
        values = weight.astype(np.int64)
    low, high = INT8_RANGE
    if values.size and (values.min() < low or values.max() > high):
        return [f"{place}: quantized weights reach [{int(values.min())}, {int(values.max())}]; TensorRT's int8 "
                f"weights lie in [{low}, {high}]"]
    return []
