"""Lowering: repfx.compile backends, repfx.export, torch.compile(backend="repfx"), the torch-tensorrt hook.

TensorRT cannot be installed on the CI machines: its tests run only where
torch_tensorrt imports and a CUDA device exists, and skip with the probe's reason
elsewhere. Everything before the engine runs here for real.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter

import onnx
import pytest
import torch
from torch import nn

import repfx
from repfx.backends import probe_torch_tensorrt, resolve_backend
from repfx.verify.opcount import OpCounter
from repfx.samples import build_sample, randomize_bn_

from helpers import assert_matches, assert_ops, rand

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


# --- repfx.compile ----------------------------------------------------------------------------------------------

def test_compile_eager_is_the_verified_plain_graph(net, x):
    deployed = repfx.compile(net, (x,), backend="eager")
    assert deployed.backend == "eager" and deployed.report.backend == "eager"
    assert deployed.report.backend_max_abs_error <= deployed.report.backend_tolerance
    assert_matches(net, deployed, x)
    assert_ops(deployed, x, convolution=BLOCKS, batch_norm=0, add=0)


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


def test_compile_fp16_casts_after_folding_and_returns_the_callers_dtype(net, x):
    deployed = repfx.compile(net, (x,), backend="eager", precision="fp16")
    assert {p.dtype for p in deployed.plain.parameters()} | {b.dtype for b in deployed.plain.buffers()} <= {
        torch.float32, torch.int64}, "the plain fp32 graph stays available"
    with torch.no_grad():
        expected, got = net(x), deployed(x)
    assert got.dtype == torch.float32
    assert (got - expected).abs().max() <= 1e-2 * max(1.0, expected.abs().max().item())


def test_compile_inductor_matches(net, x):
    deployed = repfx.compile(net, (x,), backend="inductor")
    assert_matches(net, deployed, x)


def test_auto_falls_back_to_inductor_and_logs_why(caplog):
    if TENSORRT.usable:
        pytest.skip("TensorRT is usable here: auto picks it")
    name, reason = resolve_backend("auto")
    assert name == "inductor" and "torch_tensorrt" in reason
    block = randomize_bn_(build_sample("repvgg_block"), 0).eval()
    with caplog.at_level(logging.INFO, logger="repfx"):
        deployed = repfx.compile(block, (rand(1, 32, 8, 8),))
    assert deployed.backend == "inductor"
    lines = [r.getMessage() for r in caplog.records if r.name == "repfx"]
    assert len(lines) == 1 and "inductor" in lines[0] and "TensorRT unavailable" in lines[0]


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


# --- repfx.export ------------------------------------------------------------------------------------------------

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


@pytest.mark.skipif(TENSORRT.usable, reason="TensorRT is usable here")
def test_export_engine_requested_explicitly_fails_before_writing(net, x, tmp_path):
    with pytest.raises(repfx.BackendUnavailable, match="TensorRT"):
        repfx.export(net, (x,), tmp_path / "out", formats=("pt2", "engine"))
    assert not (tmp_path / "out").exists()


def test_export_failure_leaves_no_partial_output(net, x, tmp_path, monkeypatch):
    import repfx.deploy.export as export_module

    def broken(program):
        raise repfx.LoweringError("simulated ONNX exporter failure")

    monkeypatch.setattr(export_module, "export_onnx", broken)
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


def test_export_fp16_onnx_is_half_and_checked(net, x, tmp_path):
    result = repfx.export(net, (x,), tmp_path, formats=("onnx",), precision="fp16")
    model = onnx.load(str(result.files["onnx"]))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert result.report.backend_max_abs_error <= result.report.backend_tolerance


@needs_tensorrt
def test_export_engine_where_tensorrt_exists(net, x, tmp_path):
    result = repfx.export(net, (x,), tmp_path, formats=("pt2", "engine"), name="acb")
    assert result.files["engine"].stat().st_size > 0
    loaded = torch.export.load(str(result.files["trt_pt2"])).module()
    assert_matches(net.cuda(), loaded, x.cuda())


# --- regressions from review ---------------------------------------------------------------------------------------

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


def test_a_program_with_a_dynamic_batch_is_exported_dynamic(net, tmp_path):
    program = torch.export.export(net, (rand(2, 3, 64, 64),), dynamic_shapes=({0: torch.export.Dim("b", max=16)},))
    result = repfx.export(program, (rand(2, 3, 64, 64),), tmp_path, formats=("pt2", "onnx"))
    (value,) = [n.meta["val"] for n in torch.export.load(str(result.files["pt2"])).graph.nodes
                if n.op == "placeholder" and n.name in result.program.graph_signature.user_inputs]
    assert not isinstance(value.shape[0], int)
    assert onnx.load(str(result.files["onnx"])).graph.input[0].type.tensor_type.shape.dim[0].dim_param


def test_commit_puts_the_directory_back_when_a_move_fails(tmp_path):
    from repfx.deploy.staging import staged

    (tmp_path / "model.pt2").write_text("old")
    (tmp_path / "model.onnx").mkdir()
    with pytest.raises(ValueError, match="in the way"), staged(tmp_path) as staging:
        staging.file("model.pt2").write_text("new")
        staging.file("model.onnx").write_text("new")
        staging.commit()
    assert (tmp_path / "model.pt2").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.pt2"]
