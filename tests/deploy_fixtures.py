"""What the deploy tests (``tests/backends``, ``tests/deploy``) share: the ACNet sample, its input, the TensorRT probe.

The fixtures reach the tests through each folder's ``conftest.py``.
"""

from __future__ import annotations

from collections import Counter

import onnx
import pytest

from repfx.backends import probe_torch_tensorrt
from repfx.samples import build_sample, randomize_bn_

from helpers import rand

TENSORRT = probe_torch_tensorrt()
needs_tensorrt = pytest.mark.skipif(not TENSORRT.usable, reason=f"TensorRT unavailable: {TENSORRT.reason}")
BLOCKS = 5  # acb_net: five ACNet blocks (3x3 + 1x3 + 3x1, each with BN) -> five plain convolutions


@pytest.fixture(scope="module")
def net():
    return randomize_bn_(build_sample("acb_net"), 0).eval()


@pytest.fixture(scope="module")
def x():
    return rand(2, 3, 64, 64)


def onnx_op_counts(model_bytes: bytes) -> Counter:
    return Counter(node.op_type for node in onnx.load_from_string(model_bytes).graph.node)
