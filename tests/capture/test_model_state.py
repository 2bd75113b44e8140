"""The model as given: state a forward writes, and submodules left in train mode inside an eval model.

Verification compares against repfx's own eval-mode capture, so it cannot see either
problem; these tests compare against the user's model itself.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import repfx
from torch import nn

from helpers import assert_matches, assert_ops, build, rand, reparam


class StepCounter(nn.Module):
    """conv + BN whose forward counts its calls in a buffer and adds the count to the output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.step += 1
        return self.bn(self.conv(x)) + self.step


def test_forward_that_writes_a_buffer_keeps_its_behaviour_from_the_models_state():
    model = build(StepCounter)
    x = rand(2, 3, 8, 8)
    gm, report = reparam(model, x)
    assert int(model.step) == 0, "the user's model was advanced"
    assert int(gm.get_buffer("step")) == 0, "verification or the proofs advanced the returned graph's state"
    assert report.buffers_written == ["step"]
    assert "step" in str(report)
    twin = copy.deepcopy(model)  # the model as given, called the same number of times as the graph
    for _ in range(3):
        with torch.no_grad():
            expected, actual = twin(x), gm(x)
        assert torch.allclose(actual, expected, rtol=1e-4, atol=1e-4)
    assert int(gm.get_buffer("step")) == 3
    assert_ops(copy.deepcopy(gm), x, convolution=1, batch_norm=0)


def test_model_without_written_state_reports_none():
    _, report = reparam(build(lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))), rand(1, 3, 8, 8))
    assert report.buffers_written == []


class DropPathLike(nn.Module):
    """A custom module whose forward branches on ``self.training`` (timm's DropPath does)."""

    def forward(self, x):
        if self.training:
            return x * 0.5
        return x


class Net(nn.Module):
    def __init__(self, track_running_stats: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8, track_running_stats=track_running_stats)
        self.drop = nn.Dropout(0.3)
        self.path = DropPathLike()

    def forward(self, x):
        return self.path(self.drop(self.bn(self.conv(x))))


@pytest.mark.parametrize("submodule, effect", [
    pytest.param("bn", "batch statistics", id="batchnorm-adaptation"),
    pytest.param("drop", "at random", id="mc-dropout"),
    pytest.param("path", "self.training", id="custom-training-branch"),
])
def test_train_mode_submodule_of_an_eval_model_is_named(submodule, effect):
    model = build(Net)
    getattr(model, submodule).train()
    with pytest.warns(UserWarning, match=rf"eval mode but 1 submodule.*{submodule} \("):
        _, report = reparam(model, rand(2, 3, 8, 8))
    assert len(report.mode_changes) == 1
    assert str(report.mode_changes[0]).startswith(f"{submodule} (") and effect in str(report.mode_changes[0])
    assert "train-mode modules captured in eval mode (1)" in str(report)
    assert model.get_submodule(submodule).training and not model.training  # the user's model keeps its modes


def test_eval_model_gets_no_mode_warning():
    model = build(Net)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        _, report = reparam(model, rand(2, 3, 8, 8))
    assert report.mode_changes == []


def test_batchnorm_without_running_stats_changes_nothing_and_is_not_reported():
    model = build(lambda: Net(track_running_stats=False))
    model.bn.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        _, report = reparam(model, rand(2, 3, 8, 8))
    assert report.mode_changes == []


def test_model_in_train_mode_names_the_modules_that_change():
    model = build(Net, train=True)
    with pytest.warns(UserWarning, match=r"training mode.*Modules affected: bn \(BatchNorm2d\)"):
        gm, report = reparam(model, rand(2, 3, 8, 8))
    assert [str(change).split(" ")[0] for change in report.mode_changes] == ["bn", "drop", "path"]
    assert model.training and model.bn.training  # the user's model is untouched
    assert_matches(copy.deepcopy(model).eval(), gm, rand(2, 3, 8, 8))


def test_a_timm_style_model_in_train_mode_gets_one_line_per_kind_of_change():
    """Dozens of BatchNorms that all change alike are one grouped line in the warning and in the report."""
    net = nn.Sequential(*[nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)) for _ in range(12)],
                        nn.Dropout(0.1)).train()
    with pytest.warns(UserWarning) as caught:
        report = repfx.explain(net, (torch.randn(1, 4, 8, 8),))
    warning = next(str(w.message) for w in caught if "training mode" in str(w.message))
    assert "12x BatchNorm2d (0.1, 1.1, 2.1 and 9 more)" in warning and len(warning) < 600
    section = str(report).split("train-mode modules captured in eval mode (13):\n")[1].splitlines()
    assert section[0].startswith("  12x BatchNorm2d (0.1, 1.1, 2.1 and 9 more): in train mode")
    assert section[1].startswith("  12 (Dropout): in train mode it zeroes")
    assert [change.module for change in report.mode_changes][:2] == ["0.1", "1.1"]
