"""``repfx.compile`` whatever the backend: precision casts, dtypes in and out, dynamic batch, refused options.

Backend-specific tests live in ``tests/backends/`` (one file per backend module);
the registry and the precision table in ``tests/backends/test_registry.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import repfx
from repfx.samples import randomize_bn_


from helpers import rand


def test_compile_fp16_casts_after_folding_and_returns_the_callers_dtype(net, x):
    deployed = repfx.compile(net, (x,), backend="eager", precision="fp16")
    assert {p.dtype for p in deployed.plain.parameters()} | {b.dtype for b in deployed.plain.buffers()} <= {
        torch.float32, torch.int64}, "the plain fp32 graph stays available"
    with torch.no_grad():
        expected, got = net(x), deployed(x)
    assert got.dtype == torch.float32
    assert (got - expected).abs().max() <= 1e-2 * max(1.0, expected.abs().max().item())


def test_compile_never_modifies_the_model(net, x):
    state = copy.deepcopy(net.state_dict())
    repfx.compile(net, (x,), backend="eager", precision="fp16")
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    assert not net.training


@pytest.mark.parametrize("backend, precision, error", [
    ("tvm", "fp32", "backend must be one of"),
    ("eager", "int8", "precision must be one of"),
])
def test_compile_rejects_unknown_options(net, x, backend, precision, error):
    with pytest.raises(ValueError, match=error):
        repfx.compile(net, (x,), backend=backend, precision=precision)


def test_float64_model_deploys_at_fp32_and_answers_in_float64(net, x):
    model = copy.deepcopy(net).double()
    deployed = repfx.compile(model, (x.double(),), backend="eager")
    assert {p.dtype for p in deployed.runner.parameters()} <= {torch.float32}
    with torch.no_grad():
        expected, got = model(x.double()), deployed(x.double())
    assert got.dtype == torch.float64
    assert (got - expected).abs().max() <= 1e-4 * max(1.0, expected.abs().max().item())


class _IdsAndGain(nn.Module):
    """A batched integer input (ids) and a side input that broadcasts over the batch (gain [1, C, 1, 1])."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, ids, gain):
        x = self.embed(ids).permute(0, 3, 1, 2)
        return self.bn(self.conv(x)) * gain


def test_dynamic_batch_batches_only_inputs_with_the_batch_dimension():
    model = randomize_bn_(_IdsAndGain(), 0).eval()
    ids = torch.randint(0, 10, (2, 5, 5), generator=torch.Generator().manual_seed(0))
    gain = rand(1, 4, 1, 1)
    deployed = repfx.compile(model, (ids, gain), backend="eager", dynamic_batch=True)
    wider = torch.randint(0, 10, (6, 5, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(deployed(wider, gain), model(wider, gain), rtol=1e-4, atol=1e-5)
