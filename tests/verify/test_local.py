"""Per-region float64 proofs, and what an end-to-end difference means once every region is proven.

* each rewrite is proven on the activations that reach it; one that fails is undone
  and reported, and the model keeps computing what it computed;
* outputs holding -inf/NaN agree where both sides hold the same value;
* a top-k / argmax over near-ties may flip under fp32 rounding although every fold is
  exact: accepted with a note naming the discontinuous op, refused with ``strict=True``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import repfx
from repfx import samples
from repfx.verify.local import LOCAL_RTOL
from repfx.passes import emit

from helpers import assert_matches, assert_ops, build, rand, reparam

C = 8


def test_every_rewrite_is_proven_in_float64():
    model = build(lambda: samples.RepVGGBlock(C, C))
    gm, report = reparam(model, rand(2, C, 16, 16))
    proofs = report.local_proofs
    assert len(report.rewrites) == 1
    assert proofs.regions_proven == 1 and proofs.regions_failed == 0
    assert proofs.input_sets == 2  # the example inputs and one seeded draw
    assert 0 < proofs.worst_relative_error <= LOCAL_RTOL
    assert "local proofs: 1 region(s) matched in float64" in str(report)


def test_rewrite_that_fails_its_local_proof_is_undone_and_reported(monkeypatch):
    """A wrong fold (a corrupted emitted weight, in its exact value too) never reaches the result."""
    real = emit.Emitter._constant

    def corrupt(self, out, kind, value, dtype):
        return real(self, out, kind, value + 0.25 if kind == "weight" else value, dtype)

    monkeypatch.setattr(emit.Emitter, "_constant", corrupt)
    model = build(lambda: samples.RepVGGBlock(C, C))
    x = rand(2, C, 16, 16)
    gm, report = reparam(model, x)
    assert report.rewrites == []
    assert any(r.reason.startswith("local proof failed") for r in report.refusals), report.refusals
    assert report.local_proofs.regions_failed == 1 and report.local_proofs.regions_proven == 0
    assert_ops(gm, x, convolution=2, batch_norm=3)  # the region as written
    assert_matches(model, gm, x)
    assert not [name for name, _ in gm.named_parameters() if name.startswith("repfx_")], "erased weights stayed"


class MaskedScores(nn.Module):
    """conv + BN whose negative outputs are masked to -inf, as attention masks and NMS scores are."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, C, 3, padding=1), nn.BatchNorm2d(C)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y.masked_fill(y < 0, float("-inf"))


def test_outputs_holding_minus_inf_verify():
    model = build(MaskedScores)
    x = rand(2, 3, 8, 8)
    gm, report = reparam(model, x)
    assert report.max_abs_error is not None and report.max_abs_error < 1e-4
    assert report.verification_note is None
    assert_ops(gm, x, convolution=1, batch_norm=0)
    with torch.no_grad():
        expected, actual = model(x), gm(x)
    assert torch.equal(torch.isinf(expected), torch.isinf(actual))


class NearTies(nn.Module):
    """Two channels equal in exact arithmetic, summed from three branches in different orders.

    Channel 0 is (A + B) + C and channel 1 is (C + B) + A in fp32, so the original's
    argmax over channels follows rounding noise, while the folded conv computes both
    channels with the same weights and always picks channel 0: RT-DETR's query
    selection over near-tied scores behaves like this.
    """

    def __init__(self) -> None:
        super().__init__()
        self.branches = nn.ModuleList(nn.Conv2d(4, 2, 3, padding=1, bias=False) for _ in range(3))
        a, b, c = (torch.randn(1, 4, 3, 3) * 10 for _ in range(3))
        with torch.no_grad():
            self.branches[0].weight.copy_(torch.cat([a, c]))
            self.branches[1].weight.copy_(torch.cat([b, b]))
            self.branches[2].weight.copy_(torch.cat([c, a]))
        self.bn = nn.BatchNorm2d(2)

    def forward(self, x):
        scores = self.bn(self.branches[0](x) + self.branches[1](x) + self.branches[2](x))
        return scores.argmax(dim=1)


def _near_ties() -> nn.Module:
    model = build(NearTies)
    with torch.no_grad():  # both channels get the same BN so that they stay tied
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(model.bn, name)[1] = getattr(model.bn, name)[0]
    return model


def test_selection_flips_after_exact_folds_are_accepted_with_a_note():
    model, x = _near_ties(), rand(2, 4, 16, 16)
    with pytest.warns(UserWarning, match="argmax"):
        gm, report = reparam(model, x)
    assert report.local_proofs.regions_proven == 1
    assert "integer/bool values differ" in report.verification_note
    assert "argmax" in report.verification_note and "discontinuous" in report.verification_note
    assert_ops(gm, x, convolution=1, batch_norm=0, add=0)


def test_strict_refuses_what_rounding_flips():
    with pytest.raises(repfx.VerificationError, match="strict=True"):
        repfx.reparameterize(_near_ties(), (rand(2, 4, 16, 16),), strict=True)
