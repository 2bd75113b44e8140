"""quantizers: both formats on a small seeded conv net, their file layout and held-out SNR, exclusions and errors.

The layout checked is what each target runs fast: ONNX Runtime's CPU format (uint8 activations, int8
per-channel weights) must fuse to QLinearConv in ONNX Runtime; ModelOpt's TensorRT format keeps
symmetric int8 Q/DQ pairs and float biases (its rules are ``test_qdq_check``'s).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from int8_fixtures import image_feeds, needs_modelopt
from onnx import numpy_helper

from repfx.errors import BackendUnavailable, LoweringError
from repfx.int8 import quantizers
from repfx.int8.metrics import score
from repfx.int8.quantizers import quantize
from repfx.int8.sensitivity import run_onnx


def op_counts(model: onnx.ModelProto) -> Counter:
    return Counter(node.op_type for node in model.graph.node)


def weight_sources(model: onnx.ModelProto) -> dict[str, str]:
    """Weighted node -> the op type producing its weight ("initializer" for a float constant)."""
    producer = {output: node.op_type for node in model.graph.node for output in node.output}
    return {node.name: producer.get(node.input[1], "initializer") for node in model.graph.node
            if node.op_type in ("Conv", "Gemm")}


def held_out_snr(fp32_path, int8: bytes, feeds) -> float:
    return score(run_onnx(fp32_path.read_bytes(), feeds), run_onnx(int8, feeds)).worst_snr_db


def test_cpu_format_is_onnxruntime_qdq_that_fuses_to_qlinearconv(small_onnx, calibration, held_out, tmp_path):
    int8 = quantize(small_onnx, calibration, "cpu")
    model = onnx.load_from_string(int8)
    counts = op_counts(model)
    assert counts["Conv"] == 4 and counts["Gemm"] == 1 and counts["QuantizeLinear"] >= 5
    assert set(weight_sources(model).values()) == {"DequantizeLinear"}
    initializers = {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer}
    activation_zero_points = [initializers[node.input[2]] for node in model.graph.node
                              if node.op_type == "QuantizeLinear"]
    assert {zero_point.dtype for zero_point in activation_zero_points} == {np.dtype(np.uint8)}
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(int8, options, providers=["CPUExecutionProvider"])
    assert op_counts(onnx.load(options.optimized_model_filepath))["QLinearConv"] == 4
    assert held_out_snr(small_onnx, int8, held_out) > 40  # 48 dB measured


def test_excluded_nodes_stay_float(small_onnx, calibration):
    model = onnx.load_from_string(quantize(small_onnx, calibration, "cpu", exclude=["node_conv2d_3"]))
    sources = weight_sources(model)
    assert sources.pop("node_conv2d_3") == "initializer"
    assert set(sources.values()) == {"DequantizeLinear"}


@needs_modelopt
@pytest.mark.slow
def test_tensorrt_format_is_modelopt_qdq(small_onnx, calibration, held_out):
    int8 = quantize(small_onnx, calibration, "tensorrt")
    model = onnx.load_from_string(int8)
    counts = op_counts(model)
    # Q/DQ on the input of each Conv (activation and weight); ModelOpt leaves the classifier's Gemm in float.
    assert counts["QuantizeLinear"] == counts["DequantizeLinear"] == 8 and counts["Conv"] == 4
    assert weight_sources(model)["node_linear"] == "initializer"
    assert held_out_snr(small_onnx, int8, held_out) > 50  # 62 dB measured
    excluded = onnx.load_from_string(quantize(small_onnx, calibration, "tensorrt", exclude=["node_conv2d_1"]))
    assert weight_sources(excluded)["node_conv2d_1"] == "initializer"
    assert weight_sources(excluded)["node_conv2d"] == "DequantizeLinear"  # names are exact, not patterns


@pytest.mark.parametrize("calibration, exclude, fmt, message", [
    ([], (), "cpu", "non-empty list of feeds"),
    ({"x": np.zeros((8, 3, 16, 16), np.float32)}, (), "cpu", "non-empty list of feeds"),
    ([{"image": np.zeros((8, 3, 16, 16), np.float32)}], (), "cpu", "the model's inputs are"),
    ([{"x": np.zeros((3, 16, 16), np.float32)}], (), "cpu", "float tensor of rank 4"),
    ([{"x": np.full((8, 3, 16, 16), np.nan, np.float32)}], (), "cpu", "NaN"),
    (None, ["conv_that_is_not_there"], "cpu", "not nodes of"),
    (None, "node_conv2d", "cpu", "pass a list of node names"),
    (None, (), "int4", "choose one of"),
], ids=["empty", "a-dict", "wrong-name", "wrong-rank", "nan", "unknown-exclude", "one-string", "unknown-format"])
def test_bad_input_gets_one_line(small_onnx, calibration, exclude, fmt, message):
    feeds = image_feeds(1, seed=3) if calibration is None else calibration
    with pytest.raises(ValueError, match=message) as caught:
        quantize(small_onnx, feeds, fmt, exclude=exclude)
    assert "\n" not in str(caught.value)


def test_missing_modelopt_names_the_install_command(small_onnx, monkeypatch):
    monkeypatch.setattr(quantizers, "MODELOPT_PACKAGES", ("modelopt", "repfx_no_such_package"))
    with pytest.raises(BackendUnavailable, match=r"pip install -e '\.\[int8\]'") as caught:
        quantize(small_onnx, image_feeds(1, seed=3), "tensorrt")
    assert "\n" not in str(caught.value)


@pytest.mark.slow
def test_a_failing_worker_reaches_the_user_as_one_line(small_onnx, monkeypatch):
    monkeypatch.setattr(quantizers, "probe_modelopt", lambda: quantizers.Probe(True, "stubbed"))
    monkeypatch.setattr(quantizers, "WORKER", "repfx.int8.no_such_worker")
    with pytest.raises(LoweringError, match="ModelOpt ONNX PTQ failed on small.onnx: .*no_such_worker") as caught:
        quantize(small_onnx, image_feeds(1, seed=3), "tensorrt")
    assert "\n" not in str(caught.value)
