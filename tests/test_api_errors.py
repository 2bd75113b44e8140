"""Errors a person can act on, from the Python API: one short first line, naming what to fix."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import repfx

from helpers import assert_matches, assert_ops, build, rand, reparam


def conv_bn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))


class BranchesOnValues(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:  # the line the error must name
            return y
        return -y


def test_capture_error_names_the_users_line_in_a_short_first_line(capfd):
    with pytest.raises(repfx.CaptureError) as caught:
        repfx.reparameterize(BranchesOnValues().eval(), (rand(1, 3, 8, 8),))
    first = str(caught.value).splitlines()[0]
    assert len(first) < 200, first
    assert "test_api_errors.py:" in first and "if y.sum() > 0:" in first, first
    assert "data-dependent" in first
    assert str(caught.value).splitlines()[1].startswith("Fix:")
    assert isinstance(caught.value.__cause__, Exception)  # torch's full error stays chained
    err = capfd.readouterr().err
    assert "def forward" not in err and len(err) < 2000, f"torch's graph dump reached stderr:\n{err[:500]}"


@pytest.mark.parametrize("name, value", [
    ("rtol", -1e-4), ("rtol", math.nan), ("atol", math.inf), ("atol", "1e-4"), ("rtol", True)])
def test_bad_tolerances_are_refused_before_any_work(name, value):
    with pytest.raises(ValueError, match=rf"{name} must be a finite number >= 0"):
        repfx.reparameterize(build(conv_bn), (rand(1, 3, 8, 8),), **{name: value})


def test_float64_model_and_inputs_work():
    model = build(conv_bn).double()
    x = rand(2, 3, 8, 8).double()
    gm, report = reparam(model, x)
    assert next(gm.parameters()).dtype == torch.float64
    assert report.max_rel_error <= 1e-9
    assert_ops(gm, x, convolution=1, batch_norm=0)


def test_float64_inputs_to_a_float32_model_say_which_dtype_to_use():
    with pytest.raises(repfx.CaptureError, match=r"(?s)Fix: the example inputs are torch.float64 but the model's "
                                                  r"parameters are torch.float32"):
        repfx.reparameterize(build(conv_bn), (rand(1, 3, 8, 8).double(),))


def test_nan_and_inf_in_example_inputs_work_with_a_note():
    model = build(conv_bn)
    x = rand(2, 3, 8, 8)
    x[0, 0, 0, 0], x[1, 2, 3, 3] = math.nan, math.inf
    gm, report = reparam(model, x)
    assert any("example input 0 holds NaN or inf" in note for note in report.notes)
    assert report.local_proofs.regions_proven == 1
    assert_ops(gm, x, convolution=1, batch_norm=0)
    assert_matches(model, gm, rand(2, 3, 8, 8))



def test_float64_inputs_are_refused_up_front_even_where_export_would_trace_them():
    """A RepVGG block traced fine and failed only when run ("expected scalar type Double"), and then again when
    folded in parts: one message, no second line about parts."""
    import torch

    from repfx.samples import build_sample

    with pytest.raises(repfx.CaptureError, match=r"Fix: the example inputs are torch.float64 but the model's "
                                                 r"parameters are torch.float32") as caught:
        repfx.reparameterize(build_sample("repvgg_block").eval(), (torch.randn(1, 32, 8, 8, dtype=torch.float64),))
    assert "in parts" not in str(caught.value)
