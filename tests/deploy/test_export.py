"""``repfx.export`` whatever the formats: what it writes by default, what it refuses, all or nothing.

The artifacts of one backend (the ``.onnx``, the TensorRT engine) are tested with
that backend in ``tests/backends/``.
"""

from __future__ import annotations

import onnx
import pytest
import torch

import repfx

from deploy_fixtures import BLOCKS, TENSORRT, onnx_op_counts
from helpers import assert_matches, assert_ops, rand


def test_export_writes_pt2_and_onnx_and_says_why_no_engine(net, x, tmp_path):
    result = repfx.export(net, (x,), tmp_path, name="acb")
    assert set(result.files) >= {"pt2", "onnx", "report"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in result.files.values())
    if not TENSORRT.usable:
        assert "engine" in result.skipped and "TensorRT" in result.skipped["engine"]
    loaded = torch.export.load(str(result.files["pt2"])).module()
    assert_matches(net, loaded, x)
    assert_ops(loaded, x, convolution=BLOCKS, batch_norm=0, add=0)
    assert onnx_op_counts(result.files["onnx"].read_bytes())["Conv"] == BLOCKS
    assert result.report.backend == "onnxruntime" and result.report.backend_max_abs_error is not None


def test_export_failure_leaves_no_partial_output(net, x, tmp_path, monkeypatch):
    import repfx.backends.onnx as onnx_backend

    def broken(program):
        raise repfx.LoweringError("simulated ONNX exporter failure")

    monkeypatch.setattr(onnx_backend, "export_onnx", broken)
    (tmp_path / "keep.txt").write_text("unrelated")
    with pytest.raises(repfx.LoweringError, match="simulated"):
        repfx.export(net, (x,), tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"], "pt2 was staged, so it must not land alone"


def test_export_never_overwrites_the_input(net, x, tmp_path):
    source = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(net, (x,)), source)
    before = source.read_bytes()
    with pytest.raises(ValueError, match="input model"):
        repfx.export(torch.export.load(str(source)), (x,), tmp_path, name="model", protected=[source])
    assert source.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt2"]


@pytest.mark.parametrize("formats", [(), ("pt2", "plan")])
def test_export_rejects_unknown_formats(net, x, tmp_path, formats):
    with pytest.raises(ValueError, match="formats must be"):
        repfx.export(net, (x,), tmp_path, formats=formats)


def test_a_program_with_a_dynamic_batch_is_exported_dynamic(net, tmp_path):
    program = torch.export.export(net, (rand(2, 3, 64, 64),), dynamic_shapes=({0: torch.export.Dim("b", max=16)},))
    result = repfx.export(program, (rand(2, 3, 64, 64),), tmp_path, formats=("pt2", "onnx"))
    (value,) = [n.meta["val"] for n in torch.export.load(str(result.files["pt2"])).graph.nodes
                if n.op == "placeholder" and n.name in result.program.graph_signature.user_inputs]
    assert not isinstance(value.shape[0], int)
    assert onnx.load(str(result.files["onnx"])).graph.input[0].type.tensor_type.shape.dim[0].dim_param
