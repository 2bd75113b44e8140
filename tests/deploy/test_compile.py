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
    ("eager", "int4", "precision must be one of"),
    ("eager", "int8", "runs no INT8 model"),
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


# --- every check judges a difference alike (issue 17 item 2) --------------------------------------------------------

class Ranked(nn.Module):
    """conv + BN whose outputs are ranked (RT-DETR's query selection in small): near-ties flip on the last bit."""

    def __init__(self, select: bool = True) -> None:
        super().__init__()
        self.conv, self.bn, self.select = nn.Conv2d(4, 16, 3, padding=1), nn.BatchNorm2d(16), select

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return y.flatten().argsort() if self.select else y


def _deployed_with_rounding(select: bool):
    """The plain graph, and a 'backend' that computes it with other fp32 rounding (weights off by 1e-6)."""
    from repfx.deploy.compile import DeployedModel

    x = rand(1, 4, 32, 32)
    plain = repfx.reparameterize(randomize_bn_(Ranked(select), 0).eval(), (x,))
    other = copy.deepcopy(plain)
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.mul_(1 + 1e-6 * torch.randn_like(parameter))
    return plain, DeployedModel(other, backend="eager", precision="fp32", plain=plain, report=plain.repfx_report), x


def test_a_backend_difference_through_a_selection_is_accepted_with_a_note_as_the_rewrite_is():
    from repfx.deploy.compile import check_against_plain
    from repfx.settings import Settings

    plain, deployed, x = _deployed_with_rounding(select=True)
    with pytest.warns(UserWarning, match="discontinuous ops .*argsort.*Accepted"):
        check_against_plain(plain, deployed, [(x,)], "fp32", Settings(), "the eager backend")
    assert "argsort" in plain.repfx_report.backend_note
    plain.repfx_report.backend, plain.repfx_report.precision = "eager", "fp32"
    plain.repfx_report.backend_max_abs_error = plain.repfx_report.backend_tolerance = 1.0
    assert "beyond it, accepted: see the note" in str(plain.repfx_report)
    with pytest.raises(repfx.VerificationError, match="strict=True"):
        check_against_plain(plain, deployed, [(x,)], "fp32", Settings(strict=True), "the eager backend")


def test_a_backend_difference_without_a_selection_is_an_error():
    from repfx.deploy.compile import check_against_plain
    from repfx.settings import Settings

    plain, deployed, x = _deployed_with_rounding(select=False)
    with torch.no_grad():
        deployed.runner.get_parameter(next(n for n, _ in deployed.runner.named_parameters())).add_(1.0)
    with pytest.raises(repfx.VerificationError, match="the eager backend: output 0"):
        check_against_plain(plain, deployed, [(x,)], "fp32", Settings(), "the eager backend")


def test_the_headline_says_whether_the_difference_was_within_the_applied_tolerance():
    report = repfx.reparameterize(randomize_bn_(Ranked(False), 0).eval(), (rand(1, 4, 8, 8),)).repfx_report
    assert "within tolerance (tolerance applied" in str(report)


def test_the_auto_backends_choice_and_why_are_in_the_report():
    model = randomize_bn_(Ranked(False), 0).eval()
    deployed = repfx.compile(model, (rand(1, 4, 8, 8),), backend="auto")
    assert [note for note in deployed.report.notes if note.startswith(f"backend='auto' chose {deployed.backend!r}: ")]
