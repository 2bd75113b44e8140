"""Public API: input kinds, explain, errors, report, CLI."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import repfx
from repfx.verify.opcount import count_ops, summarize
from repfx.samples import build_sample, randomize_bn_


@pytest.fixture(scope="module")
def block():
    return randomize_bn_(build_sample("repvgg_block"), 0).eval()


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 32, 16, 16, generator=torch.Generator().manual_seed(1))


def _assert_plain_and_exact(gm, model, x):
    counts = summarize(count_ops(gm, (x,)))
    assert (counts["convolution"], counts["batch_norm"], counts["add"]) == (1, 0, 0)
    with torch.no_grad():
        want, got = model(x), gm(x)
    assert (want - got).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item())


def test_nn_module_input(block, x):
    _assert_plain_and_exact(repfx.reparameterize(block, (x,)), block, x)


def test_exported_program_input(block, x):
    _assert_plain_and_exact(repfx.reparameterize(torch.export.export(block, (x,)), (x,)), block, x)


def test_graph_module_input(block, x):
    gm = torch.fx.symbolic_trace(block)
    _assert_plain_and_exact(repfx.reparameterize(gm, (x,)), block, x)


@pytest.mark.parametrize("make", [pytest.param(lambda m, x: torch.jit.trace(m, x), id="trace"),
                                  pytest.param(lambda m, x: torch.jit.script(m), id="script")])
def test_torchscript_archive_input(block, x, make, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated upstream; users still ship archives
        path = tmp_path / "model.ts"
        torch.jit.save(make(block, x), str(path))
        gm = repfx.reparameterize(torch.jit.load(str(path)), (x,))
    _assert_plain_and_exact(gm, block, x)


def test_exported_program_from_training_mode_is_refused(x):
    model = randomize_bn_(build_sample("repvgg_block"), 0).train()
    program = torch.export.export(model, (x,))
    with pytest.raises(repfx.CaptureError, match="training"):
        repfx.reparameterize(program, (x,))


def test_unexportable_model_gives_capture_error(x):
    class DataDependent(nn.Module):
        def forward(self, t):
            if t.sum() > 0:  # Python control flow on a tensor value
                return t * 2
            return t

    with pytest.raises(repfx.CaptureError, match="torch.export could not capture DataDependent"):
        repfx.reparameterize(DataDependent().eval(), (x,))


def test_wrong_graph_raises_verification_error(block, x, monkeypatch):
    """Verification is wired in: a corrupted rewrite must raise, never return."""
    import repfx.pipeline.graph

    real = repfx.pipeline.graph.run_pipeline

    def corrupting(gm, cost, **kwargs):
        results = real(gm, cost, **kwargs)  # corrupted after the local proofs: the end-to-end check must see it
        for name, param in gm.named_parameters():
            if name.startswith("repfx_"):
                param.data.add_(0.5)
                break
        return results

    monkeypatch.setattr(repfx.pipeline.graph, "run_pipeline", corrupting)
    with pytest.raises(repfx.VerificationError, match="max \\|difference\\|"):
        repfx.reparameterize(block, (x,))


def test_explain_reports_without_verifying(block, x):
    report = repfx.explain(block, (x,))
    assert isinstance(report, repfx.Report)
    assert report.max_abs_error is None and "verify" not in report.seconds
    assert report.ops_before["batch_norm"] == 3 and report.ops_after["batch_norm"] == 0
    assert len(report.rewrites) == 1


def test_report_is_readable_and_serializable(block, x):
    report = repfx.reparameterize(block, (x,)).repfx_report
    text = str(report)
    for needle in ("executed ops", "convolution", "batch_norm", "verification", "merged (1)", "refused"):
        assert needle in text
    assert report.to_dict()["ops_after"]["convolution"] == 1
    assert set(report.seconds) >= {"capture", "rewrite", "verify"}


def test_bad_cost_policy_is_rejected(block, x):
    with pytest.raises(ValueError, match="cost"):
        repfx.reparameterize(block, (x,), cost="fastest")


def test_cli_runs_a_bundled_sample():
    result = subprocess.run([sys.executable, "-m", "repfx", "--sample", "acb_block"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "executed ops" in result.stdout and "merged (1)" in result.stdout


class Cancelling(nn.Module):
    """Two huge branches that nearly cancel: the fp32 original is itself ~1e-3 off its exact value."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.b = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        with torch.no_grad():
            self.a.weight.mul_(1e4)
            self.b.weight.copy_(-self.a.weight + 1e-2 * torch.randn_like(self.a.weight))

    def forward(self, t):
        return self.a(t) + self.b(t)


def test_rounding_noise_of_an_ill_conditioned_model_is_not_a_mismatch():
    torch.manual_seed(0)
    model, t = Cancelling().eval(), torch.randn(1, 8, 8, 8)
    with pytest.warns(UserWarning, match="outputs differ from the original beyond tolerance"):
        gm = repfx.reparameterize(model, (t,))
    report = gm.repfx_report
    assert report.ops_after["convolution"] == 1
    assert report.max_abs_error > report.tolerance  # the plain fp32 check alone would have refused it
    assert "amplifies fp32 rounding" in report.verification_note


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_model_dtype_is_kept_and_folded_once(dtype):
    """Folding runs in float64 and casts back once, so low precision loses only one rounding."""
    model = randomize_bn_(build_sample("repvgg_block"), 0).eval().to(dtype)
    t = torch.randn(2, 32, 16, 16, generator=torch.Generator().manual_seed(3)).to(dtype)
    gm = repfx.reparameterize(model, (t,))
    assert all(p.dtype == dtype for p in gm.parameters())
    assert summarize(count_ops(gm, (t,)))["batch_norm"] == 0
    with torch.no_grad():
        exact = model.double()(t.double())
    error = (gm(t).double() - exact).abs().max().item()
    original_error = (model.to(dtype)(t).double() - exact).abs().max().item()
    assert error <= max(2 * original_error, 1e-9 * exact.abs().max().item())


def test_torch_compile_wrapper_is_unwrapped(block, x):
    _assert_plain_and_exact(repfx.reparameterize(torch.compile(block), (x,)), block, x)


class TwoResidualAdds(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1) for _ in range(2))
        self.bns = nn.ModuleList(nn.BatchNorm2d(8) for _ in range(2))

    def forward(self, t):
        for conv, bn in zip(self.convs, self.bns):
            t = torch.relu(t + bn(conv(torch.relu(t))))
        return t


def test_each_refusal_is_reported_once_under_the_captured_names():
    model = randomize_bn_(TwoResidualAdds(), 0).eval()
    report = repfx.reparameterize(model, (torch.randn(1, 8, 8, 8),)).repfx_report
    assert report.iterations == 2  # the second round confirms the fixed point
    assert [r.node for r in report.refusals] == ["add", "add_1"]
    assert all("different tensors" in r.reason for r in report.refusals)


class _BranchOnValues(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if y.sum() > 0:
            return y * 2
        return y - 1


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_torchscript_data_dependent_if_becomes_cond_and_still_folds(sign):
    """TorchScript's converter turns the ``if`` into ``torch.cond``; conv+BN before it folds, both branches stay."""
    model = randomize_bn_(_BranchOnValues(), 0).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(model)
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    gm = repfx.reparameterize(scripted, (x,))
    report = gm.repfx_report
    assert (report.ops_before["batch_norm"], report.ops_after["batch_norm"]) == (1, 0)
    counts = count_ops(gm, (x,))
    assert counts["cond"] == 1
    probe = sign * 50 * torch.ones(1, 3, 8, 8)  # large inputs of either sign: the branch taken follows the data
    with torch.no_grad():
        assert torch.allclose(gm(probe), model(probe), rtol=1e-4, atol=1e-4)


def test_the_report_has_one_home_and_the_graph_meta_is_the_same_object(block, x):
    gm = repfx.reparameterize(block, (x,))
    assert gm.repfx_report is gm.meta["repfx"] and isinstance(gm.repfx_report, repfx.Report)


@pytest.mark.parametrize("kind", ["program", "graph module", "torchscript"])
def test_the_report_is_titled_with_the_class_the_user_wrote_whatever_the_input_kind(block, x, kind):
    given = {"program": lambda: torch.export.export(block, (x,)),
             "graph module": lambda: torch.export.export(block, (x,)).module(),
             "torchscript": lambda: torch.jit.trace(block, (x,))}[kind]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated
        assert repfx.explain(given, (x,)).model == type(block).__name__


def test_refusals_and_rewrites_name_the_module_paths_and_the_report_counts_rules():
    class Residual(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stage = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.BatchNorm2d(4))
            self.act = torch.nn.ReLU()

        def forward(self, x):
            y = self.act(x)
            return self.stage(y) + x  # reads y and x: no single conv computes the sum

    report = repfx.explain(randomize_bn_(Residual(), 0).eval(), (torch.randn(1, 4, 8, 8),))
    assert [rewrite.module for rewrite in report.rewrites] == ["stage"]
    residual = next(refusal for refusal in report.refusals if refusal.code == "different-inputs")
    assert residual.module == "" and residual.node.startswith("add")  # the add is the model's own forward
    assert report.rule_counts == {"convolution": 1, "batch_norm": 1, "add": 1}  # the add kept x as a term


def test_a_module_reached_through_a_sliced_sequential_is_named_by_its_own_path():
    """ultralytics runs ``for m in self.model[:-1]``: torch records ``model.slice(None, -1, None).1``."""
    class Sliced(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3, padding=1),
                                             torch.nn.BatchNorm2d(4), torch.nn.Identity())

        def forward(self, x):
            for layer in self.model[:-1]:
                x = layer(x)
            return x

    report = repfx.explain(randomize_bn_(Sliced(), 0).eval(), (torch.randn(1, 4, 8, 8),))
    assert [rewrite.module for rewrite in report.rewrites] == ["model"]  # model.1 and model.2, not model.slice(...)


def test_proving_is_a_phase_of_its_own_in_the_report(block, x):
    seconds = repfx.reparameterize(block, (x,)).repfx_report.seconds
    assert list(seconds) == ["capture", "rewrite", "prove", "verify"] and seconds["prove"] > 0


def test_a_merge_that_more_than_doubles_its_parameters_says_what_it_bought():
    from spatial_blocks import RepNeXtBlock

    report = repfx.explain(randomize_bn_(RepNeXtBlock(), 0).eval(), (torch.randn(1, 16, 56, 56),), cost="always")
    (grown,) = [rewrite for rewrite in report.rewrites if rewrite.growth_note]
    assert grown.params_after > 2 * grown.params_before > 0
    assert f"merges that more than double their parameters (1):\n  {grown.module or grown.nodes[0]}: parameters" \
        in str(report)
