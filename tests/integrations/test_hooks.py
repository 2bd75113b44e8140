"""Deploying through torch's and torch-tensorrt's own entry points: ``torch.compile(backend="repfx")`` and
repfx as torch-tensorrt's lowering pass (``repfx.integrations``).

TensorRT cannot be installed on the CI machines: the lowering pass is run here on
the graph torch-tensorrt would hand it; ``install()`` is checked to name the missing piece.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import repfx
from repfx.samples import build_sample, randomize_bn_

from deploy_fixtures import BLOCKS, TENSORRT
from helpers import assert_matches, assert_ops, rand


# --- torch.compile(backend="repfx") ---------------------------------------------------------------------------

def test_torch_compile_backend_by_name_matches(net, x):
    torch._dynamo.reset()
    compiled = torch.compile(net, backend="repfx")
    with torch.no_grad():
        assert_matches(net, compiled, x)


def test_torch_compile_backend_is_an_installed_entry_point():
    import importlib.metadata

    (entry,) = importlib.metadata.entry_points(group="torch_dynamo_backends", name="repfx")
    from repfx.integrations.dynamo import repfx_backend

    assert entry.load() is repfx_backend


def test_dynamo_graph_is_reparameterized_with_module_state_frozen(net, x):
    """What the backend hands to inductor: the plain graph, taking only the real input."""
    from repfx.integrations.dynamo import plain_graph

    seen = []

    def spy(gm, example_inputs):
        seen.append(plain_graph(gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(net, backend=spy)(x)
    (plain, runtime_positions), = seen
    assert len(runtime_positions) == 1
    assert_ops(plain, x, convolution=BLOCKS, batch_norm=0, add=0)
    assert_matches(net, plain, x)


def test_torch_compile_backend_leaves_training_graphs_alone(x):
    model = randomize_bn_(build_sample("acb_block"), 0).train()
    torch._dynamo.reset()
    with pytest.warns(UserWarning, match="without re-parameterization"):
        torch.compile(model, backend="repfx")(rand(2, 16, 8, 8))


class _CountsCalls(nn.Module):
    """Writes a buffer in forward: freezing it would bake the compile-time count into the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.bn(self.conv(x)) * self.calls


def test_torch_compile_backend_does_not_freeze_state_the_model_writes():
    model = randomize_bn_(_CountsCalls(), 0).eval()
    reference = copy.deepcopy(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="repfx")
    x = rand(1, 3, 8, 8)
    with torch.no_grad(), pytest.warns(UserWarning, match="writes module state"):
        first = compiled(x)
    with torch.no_grad():
        assert torch.allclose(first, reference(x), rtol=1e-4, atol=1e-5)
        assert torch.allclose(compiled(x), reference(x), rtol=1e-4, atol=1e-5)
    assert model.calls.item() == reference.calls.item() == 2


def test_torch_compile_backend_leaves_graphs_that_need_gradients_alone(net, x):
    torch._dynamo.reset()
    with pytest.warns(UserWarning, match="inference backend"):
        out = torch.compile(net, backend="repfx")(x)
    assert out.requires_grad


@pytest.mark.parametrize("kwargs", [{"mode": "max-autotune-no-cudagraphs"}, {"options": {"max_autotune": False}}])
def test_torch_compile_backend_takes_torch_compile_options(net, x, kwargs):
    torch._dynamo.reset()
    with torch.no_grad():
        assert_matches(net, torch.compile(net, backend="repfx", **kwargs), x)


# --- torch-tensorrt lowering pass ------------------------------------------------------------------------------

def _as_torch_tensorrt_lowers(model, x):
    """The graph a torch-tensorrt lowering pass receives: decomposed, unlifted, weights as get_attr."""
    program = torch.export.export(copy.deepcopy(model), (x,)).run_decompositions()
    return program.module()


def test_lowering_pass_folds_the_graph_torch_tensorrt_lowers(net, x):
    from repfx.integrations.torch_tensorrt import repfx_lowering_pass

    gm = _as_torch_tensorrt_lowers(net, x)
    out = repfx_lowering_pass(gm, settings=None)
    assert_ops(out, x, convolution=BLOCKS, batch_norm=0, add=0)
    assert_matches(net, out, x)
    before = dict(assert_ops(out, x, convolution=BLOCKS))
    assert dict(assert_ops(repfx_lowering_pass(out), x, convolution=BLOCKS)) == before  # idempotent


def test_lowering_pass_refuses_to_pass_on_an_unverifiable_rewrite(net, x):
    from repfx.integrations.torch_tensorrt import repfx_lowering_pass

    gm = _as_torch_tensorrt_lowers(net, x)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            node.meta.pop("val", None)
    with pytest.raises(repfx.VerificationError, match="cannot be verified"):
        repfx_lowering_pass(gm)


@pytest.mark.skipif(TENSORRT.usable, reason="TensorRT is usable here")
def test_install_names_the_missing_piece_here():
    from repfx import torch_tensorrt as hook

    with pytest.raises(repfx.BackendUnavailable, match="torch_tensorrt"):
        hook.install()
