"""The onnx backend: ``torch.onnx.export(dynamo=True)`` run by onnxruntime, and the ``.onnx`` ``repfx.export`` writes."""

from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

import repfx
from repfx.verify.opcount import OpCounter
from repfx.samples import randomize_bn_

from deploy_fixtures import BLOCKS, onnx_op_counts
from helpers import assert_matches, rand


def test_compile_onnx_runs_in_onnxruntime_and_matches_torch(net, x):
    deployed = repfx.compile(net, (x,), backend="onnx")
    assert type(deployed.runner).__name__ == "OnnxRuntimeModule"
    with OpCounter() as counter:  # onnxruntime executes the model: torch runs no convolution
        deployed(x)
    assert counter.counts["aten.convolution.default"] == 0
    assert_matches(net, deployed, x)


def test_onnx_graph_has_one_conv_per_merged_block(net, x):
    from repfx.backends.onnx import export_onnx
    from repfx.backends.program import export_program

    plain = repfx.reparameterize(net, (x,))
    counts = onnx_op_counts(export_onnx(export_program(plain, (x,))))
    assert counts["Conv"] == BLOCKS
    assert counts["BatchNormalization"] == 0 and counts["Add"] == 0


def test_compile_onnx_dynamic_batch_runs_other_batch_sizes(net, x):
    deployed = repfx.compile(net, (x[:1],), backend="onnx", dynamic_batch=True)
    assert_matches(net, deployed, rand(5, 3, 64, 64))


def test_export_fp16_onnx_is_half_and_checked(net, x, tmp_path):
    result = repfx.export(net, (x,), tmp_path, formats=("onnx",), precision="fp16")
    model = onnx.load(str(result.files["onnx"]))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert result.report.backend_max_abs_error <= result.report.backend_tolerance


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x, y, scale: float = 2.0):
        return {"sum": self.bn(self.conv(x)) * scale + y, "pair": (y, None)}


def test_onnx_backend_binds_keywords_by_name_and_refuses_other_baked_scalars():
    model = randomize_bn_(_TwoInputs(), 0).eval()
    x, y = rand(2, 3, 8, 8, seed=1), rand(2, 4, 8, 8, seed=2)
    deployed = repfx.compile(model, (x, y, 2.0), backend="onnx")
    with torch.no_grad():
        expected = model(x, y)
        got = deployed(y=y, x=x, scale=2.0)
    assert torch.allclose(got["sum"], expected["sum"], rtol=1e-4, atol=1e-5)
    assert got["pair"][1] is None and torch.equal(got["pair"][0], y)
    with pytest.raises(ValueError, match="baked in"):
        deployed(x, y, scale=3.0)


def test_a_deployed_onnx_call_hands_the_callers_tensor_to_one_session_run_without_copies(net, x):
    """The deployed model's call overhead over a bare ``InferenceSession.run`` is only Python glue: tensors already
    in the deploy dtype go to the session as the same memory, once (timed by bench/deploy_speed.py, not here)."""
    import numpy as np

    deployed = repfx.compile(net, (x,), backend="onnx")
    session, calls = deployed.runner.session, []

    class Spy:
        def run(self, names, feeds):
            calls.append(feeds)
            return session.run(names, feeds)

        def __getattr__(self, name):
            return getattr(session, name)

    deployed.runner.session = Spy()
    out = deployed(x)
    assert len(calls) == 1 and np.shares_memory(next(iter(calls[0].values())), x.numpy())
    assert torch.equal(out, deployed(x))
    assert_matches(net, deployed, x)
