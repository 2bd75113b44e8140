"""Inputs that do not fit the model (``repfx.capture.input_fit``): one line naming what fits, from every model kind.

Before, a two-input TorchScript given one input hit a torch INTERNAL ASSERT, and a wrong
rank or channel count read "Invalid channel dimensions", a matmul's sizes, or a weight's
shape with symbolic sizes (``expected input[s35, 5, 32, 32]``) once a batch was dynamic.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

from repfx.capture.export import capture
from repfx.errors import CaptureError, InputMismatch

from helpers import DataDependent, TwoInputs, build, rand

SYMBOL = re.compile(r"(?<![\w.])s\d+(?![\w.])")


class Stem(nn.Module):
    """The head is registered before the stem but runs after it: "first" is the layer the input reaches first."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 2)
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.stem(x)).mean((2, 3)))


def as_kind(model: nn.Module, kind: str, *example: torch.Tensor) -> nn.Module:
    """The model as given to repfx: the module itself, or TorchScript (traced or scripted)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "traced":
            return torch.jit.trace(model, example)
        if kind == "scripted":
            return torch.jit.script(model)
    return model


KINDS = ["module", "traced", "scripted"]


@pytest.mark.parametrize("kind", KINDS)
def test_fewer_inputs_than_forward_takes_name_them(kind):
    model = as_kind(build(TwoInputs), kind, rand(1, 3, 8, 8), rand(1, 4, 8, 8))
    with pytest.raises(InputMismatch) as raised:
        capture(model, (rand(1, 3, 8, 8),))
    assert raised.value.names == ["image", "mask"]
    assert str(raised.value).startswith("TwoInputs takes 2 inputs (image, mask), got 1: "), raised.value
    assert "INTERNAL ASSERT" not in str(raised.value)


@pytest.mark.parametrize("dynamic_batch", [False, True], ids=["static", "dynamic-batch"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("given, fits", [
    pytest.param((1, 5, 8, 8), "1x3x8x8", id="channels"),
    pytest.param((3, 8, 8), "1x3x8x8", id="unbatched"),
    pytest.param((1, 1, 3, 8, 8), "Nx3xHxW", id="rank"),
])
def test_input_that_does_not_fit_the_first_convolution_says_what_fits(kind, dynamic_batch, given, fits):
    model = as_kind(build(Stem), kind, rand(2, 3, 8, 8))
    with pytest.raises(InputMismatch) as raised:
        capture(model, (rand(*given),), dynamic_batch=dynamic_batch)
    message = str(raised.value)
    assert raised.value.shapes == [fits], message
    assert "first convolution `stem` (weight 4x3x3x3) reads 3 channels (Nx3xHxW)" in message, message
    assert len(message.splitlines()) == 1 and not SYMBOL.search(message), message


@pytest.mark.parametrize("kind", ["module", "traced"])
def test_input_that_does_not_fit_the_first_linear_says_what_fits(kind):
    model = as_kind(build(lambda: nn.Sequential(nn.Linear(48, 16), nn.BatchNorm1d(16))), kind, rand(2, 48))
    with pytest.raises(InputMismatch) as raised:
        capture(model, (rand(2, 40),))
    assert raised.value.shapes == ["2x48"]
    assert "first linear `0` (weight 16x48) reads 48 features" in str(raised.value), raised.value


def test_a_failure_elsewhere_keeps_its_own_message():
    with pytest.raises(CaptureError) as raised:
        capture(build(DataDependent), (rand(1, 3, 8, 8),))
    assert not isinstance(raised.value, InputMismatch), raised.value


def test_the_model_given_is_not_run_or_hooked():
    model = build(Stem)
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(InputMismatch):
        capture(model, (rand(1, 5, 8, 8),))
    assert not any(module._forward_pre_hooks for module in model.modules())
    assert all(torch.equal(state[name], tensor) for name, tensor in model.state_dict().items())
    assert not model.training


def test_inputs_that_fit_capture_as_before():
    model = build(TwoInputs)
    captured = capture(as_kind(model, "traced", rand(1, 3, 8, 8), rand(1, 4, 8, 8)),
                       (rand(1, 3, 8, 8), rand(1, 4, 8, 8)))
    x, mask = rand(1, 3, 8, 8, seed=2), rand(1, 4, 8, 8, seed=3)
    with torch.no_grad():
        assert torch.allclose(captured.graph(x, mask), model(x, mask), atol=1e-5)
