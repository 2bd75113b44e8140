"""The tensorrt backend and the engine ``repfx.export`` writes.

TensorRT cannot be installed on the CI machines: its tests run only where
torch_tensorrt imports and a CUDA device exists, and skip with the probe's reason
elsewhere; what they check without it is how the missing piece is named.
"""

from __future__ import annotations

import pytest
import torch

import repfx

from deploy_fixtures import TENSORRT, needs_tensorrt
from helpers import assert_matches


@pytest.mark.skipif(TENSORRT.usable, reason="TensorRT is usable here")
def test_tensorrt_backend_names_the_missing_piece_here(net, x):
    with pytest.raises(repfx.BackendUnavailable, match="torch_tensorrt"):
        repfx.compile(net, (x,), backend="tensorrt")


@needs_tensorrt
def test_tensorrt_backend_matches_and_converts_everything(net, x):
    deployed = repfx.compile(net, (x.cuda(),), backend="tensorrt")
    assert_matches(net.cuda(), deployed, x.cuda())


@needs_tensorrt
def test_tensorrt_fp16(net, x):
    deployed = repfx.compile(net, (x.cuda(),), backend="tensorrt", precision="fp16")
    assert deployed(x.cuda()).dtype == torch.float32


@pytest.mark.skipif(TENSORRT.usable, reason="TensorRT is usable here")
def test_export_engine_requested_explicitly_fails_before_writing(net, x, tmp_path):
    with pytest.raises(repfx.BackendUnavailable, match="TensorRT"):
        repfx.export(net, (x,), tmp_path / "out", formats=("pt2", "engine"))
    assert not (tmp_path / "out").exists()


@needs_tensorrt
def test_export_engine_where_tensorrt_exists(net, x, tmp_path):
    result = repfx.export(net, (x,), tmp_path, formats=("pt2", "engine"), name="acb")
    assert result.files["engine"].stat().st_size > 0
    loaded = torch.export.load(str(result.files["trt_pt2"])).module()
    assert_matches(net.cuda(), loaded, x.cuda())
