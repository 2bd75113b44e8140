"""Folded weights keep the default memory format, so the plain graph's ONNX is the original's minus ops.

A 1x1-into-1x1 merge computes its weight by a matmul whose result can carry strides
such as (16, 1, 16, 16): contiguous by ``is_contiguous()``, channels-last in effect.
Conv outputs then become channels_last, eager PyTorch inserts ``as_strided_`` copies,
and the ONNX export of torchvision ``mobilenet_v3_small`` grew Gather + Reshape nodes the
model did not have. Emitted weights are stored with ``contiguous_format`` strides.
"""

from __future__ import annotations

from collections import Counter

import onnx
import pytest
import torch
from torch import nn

from repfx.backends.onnx import export_onnx
from repfx.backends.program import export_program
from repfx.capture.export import capture
from repfx.samples import randomize_bn_

from helpers import rand, reparam

torchvision = pytest.importorskip("torchvision", reason="torchvision is a test extra")


def default_strides(tensor: torch.Tensor) -> tuple[int, ...]:
    return torch.empty(tensor.shape).stride()


def test_merged_pointwise_chain_has_default_strides():
    model = nn.Sequential(nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16), nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16))
    gm, report = reparam(randomize_bn_(model, 0).eval(), rand(1, 16, 8, 8), cost="always")
    assert len(report.rewrites) == 1
    weights = [p for name, p in gm.named_parameters() if name.startswith("repfx_")]
    assert weights and all(p.stride() == default_strides(p) for p in weights)


def onnx_node_kinds(gm: torch.fx.GraphModule, inputs: tuple) -> Counter:
    model = onnx.load_from_string(export_onnx(export_program(gm, inputs)))
    return Counter(node.op_type for node in model.graph.node)


def test_plain_mobilenet_onnx_has_no_node_kind_the_original_lacks():
    torch.manual_seed(0)
    model = randomize_bn_(torchvision.models.mobilenet_v3_small(weights=None), 0).eval()
    x = rand(1, 3, 64, 64)
    original = onnx_node_kinds(capture(model, (x,)).graph, (x,))
    plain = onnx_node_kinds(reparam(model, x)[0], (x,))
    assert set(plain) <= set(original), f"new node kinds: {set(plain) - set(original)}"
    assert plain["BatchNormalization"] == 0 and plain["Conv"] <= original["Conv"]
