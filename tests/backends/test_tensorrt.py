"""The tensorrt backend and the engine ``repfx.export`` writes.

TensorRT cannot be installed on the CI machines: its tests run only where
torch_tensorrt imports and a CUDA device exists, and skip with the probe's reason
elsewhere; what they check without it is how the missing piece is named.
"""

from __future__ import annotations

import pytest
import torch

import repfx

from repfx.backends.availability import Probe, imported_torch_tensorrt
from repfx.backends.tensorrt import record_tensorrt_coverage

from deploy_fixtures import TENSORRT, needs_tensorrt
from helpers import assert_matches

TORCH_TENSORRT = imported_torch_tensorrt()
needs_torch_tensorrt = pytest.mark.skipif(isinstance(TORCH_TENSORRT, Probe),
                                          reason=getattr(TORCH_TENSORRT, "reason", ""))


class Histogram(torch.nn.Module):
    def forward(self, x):
        return torch.histc(torch.relu(x), bins=4)


@needs_torch_tensorrt
def test_the_converter_registry_of_the_installed_torch_tensorrt_is_asked(net, x):
    """A plain graph converts whole; an op torch-tensorrt has no converter for is named with its node."""
    plain = repfx.reparameterize(net, (x,), verify=False)
    report = plain.meta["repfx"]
    record_tensorrt_coverage(torch.export.export(plain, (x,)), report)
    assert report.tensorrt_ops_source == f"torch-tensorrt {TORCH_TENSORRT.__version__}"
    assert report.tensorrt_unconvertible == []
    record_tensorrt_coverage(torch.export.export(Histogram(), (torch.randn(2, 8),)), report)
    assert report.tensorrt_unconvertible == ["histc: aten.histc.default (no converter)"]


@pytest.mark.skipif(not isinstance(TORCH_TENSORRT, Probe), reason="torch_tensorrt imports here")
def test_without_torch_tensorrt_nothing_is_said_about_conversion(net, x):
    plain = repfx.reparameterize(net, (x,), verify=False)
    report = plain.meta["repfx"]
    record_tensorrt_coverage(torch.export.export(plain, (x,)), report)
    assert report.tensorrt_ops_source is None and report.tensorrt_unconvertible == []
    assert "TensorRT conversion" not in str(report)


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
