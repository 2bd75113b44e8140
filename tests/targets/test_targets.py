"""repfx.targets: device profiles (measured, cached, published), the rule a call resolves, and decisions end to end.

Every decision asserted here is taken under a pinned profile (``tests/conftest.py``
pins this machine's CPU; the others are given here or come from the published GPU
table), so none can flake on a busy machine. The one real measurement
(``measure_profile``) asserts only that it yields positive rates.
"""

from __future__ import annotations

import argparse

import json

import pytest
import torch
from torch import nn

from helpers import (COMPUTE_BOUND, LAUNCH_BOUND, DepthwiseBesideDense, assert_matches, assert_ops, build, conv_bn,
                     rand, reparam)

import repfx
from repfx.passes.cost import DeviceProfile, LatencyCost, MacsCost, MeasuredCost
from repfx.targets import cost_rule, device_profile, measure_profile, published_profile
from repfx.targets.cache import FILE_NAME, MARK, cached_profile

def block(channels: int = 16):
    return build(lambda: DepthwiseBesideDense(channels))


@pytest.mark.parametrize("profile, convolutions", [
    pytest.param(LAUNCH_BOUND, 1, id="overhead-bound-merges"),
    pytest.param(COMPUTE_BOUND, 2, id="compute-bound-keeps-apart"),
])
def test_latency_decision_per_regime(profile, convolutions):
    """Time alone decides here: the merged dense 3x3 holds 5.8x the parameters, beyond the default bound."""
    model, x = block(), rand(2, 16, 8, 8)
    gm, report = reparam(model, x, target=profile, max_param_growth=None)
    assert_matches(model, gm, x)
    assert_ops(gm, x, convolution=convolutions, batch_norm=0)
    (decision,) = report.decisions
    assert decision["merged_won"] is (convolutions == 1) and decision["how"] == "modeled"
    assert "contested decisions (1)" in str(report) and profile.name in report.cost_rule


def test_macs_keeps_apart_what_latency_merges():
    model, x = block(), rand(2, 16, 8, 8)
    gm, _ = reparam(model, x, cost="macs")
    assert_ops(gm, x, convolution=2)


def test_batch_moves_the_decision_for_a_gpu_this_machine_lacks():
    """At batch 1 an H200 is launch-bound (merge); at 128 the merged dense 7x7 is compute-bound (keep apart)."""
    class DepthwiseThenPointwise(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dw = nn.Conv2d(128, 128, 7, padding=3, groups=128, bias=False)
            self.bn = nn.BatchNorm2d(128)
            self.pw = nn.Conv2d(128, 128, 1)

        def forward(self, x):
            return self.pw(self.bn(self.dw(x)))

    model, x = build(DepthwiseThenPointwise), rand(1, 128, 28, 28)
    merged = repfx.explain(model, (x,), target="cuda:h200", batch=1, max_param_growth=None)  # 35x the parameters
    apart = repfx.explain(model, (x,), target="cuda:h200", batch=128, max_param_growth=None)
    assert merged.ops_after["convolution"] == 1 and apart.ops_after["convolution"] == 2
    assert "cuda:h200" in merged.cost_rule and "batch 128" in apart.cost_rule
    assert any(not d["merged_won"] for d in apart.decisions)


def test_explain_shows_decisions_without_verifying():
    report = repfx.explain(block(), (rand(2, 16, 8, 8),), target=COMPUTE_BOUND)
    assert report.max_abs_error is None and len(report.decisions) == 1
    assert report.to_dict()["decisions"][0]["where"]


def test_measure_on_cpu_times_the_contested_forms():
    model, x = block(8), rand(1, 8, 8, 8)
    gm, report = reparam(model, x, cost="measure")
    assert_matches(model, gm, x)
    assert report.decisions and "measured on cpu" in report.cost_rule
    for decision in report.decisions:  # which form wins depends on this machine's timings: not asserted
        assert decision["how"] == "measured" and decision["merged_cost"] > 0 and decision["apart_cost"] > 0
    assert report.ops_after["convolution"] in (1, 2)


def test_a_timed_form_feeds_each_op_what_it_would_read():
    """dw7x7 -> 1x1 kept apart: the 1x1 reads the depthwise output (a chain), not an input of its own; a form's
    ops are rebuilt at their real geometry, and a pair is timed once per shape signature."""
    from repfx.passes.algebra.forms import ConvForm
    from repfx.passes.cost import of_form
    from repfx.targets.timing import WorkModule, WorkTimer

    depthwise = of_form(ConvForm.convolution(torch.randn(16, 1, 7, 7), None, (1, 1), (3, 3), (1, 1), 16), (16, 8, 8))
    pointwise = of_form(ConvForm.convolution(torch.randn(16, 16, 1, 1), None, (1, 1), (0, 0), (1, 1), 1), (16, 8, 8))
    module = WorkModule(depthwise + pointwise, batch=2, dtype=torch.float32, device=torch.device("cpu"))
    inputs = module.inputs()
    (output,) = module(*inputs)  # the depthwise output is read by the 1x1, so only the 1x1's is handed on
    weights = list(module.weights)
    first = torch.nn.functional.conv2d(inputs[0], weights[0], weights[1], padding=3, groups=16)
    torch.testing.assert_close(output, torch.nn.functional.conv2d(first, weights[2], weights[3]))
    assert output.shape == (2, 16, 8, 8)
    timer = WorkTimer("cpu", batch=2, dtype="float32")
    seconds = timer(depthwise + pointwise, depthwise)
    assert all(value > 0 for value in seconds) and timer(depthwise + pointwise, depthwise) is seconds


def test_a_timed_elementwise_op_is_what_it_stands_for():
    """A lone BatchNorm is a scale and shift; a concatenation's copy copies; an n-way add reads n tensors."""
    from repfx.passes.algebra.forms import ConvForm
    from repfx.passes.cost import elementwise, of_form
    from repfx.targets.timing import WorkModule

    scale = of_form(ConvForm.affine(torch.rand(8, dtype=torch.float64), torch.rand(8, dtype=torch.float64), 2),
                    (8, 4, 4))
    for work, expected in ((scale, lambda x, w: x * w[0].view(-1, 1, 1) + w[1].view(-1, 1, 1)),
                           (elementwise((8, 4, 4), 1), lambda x, w: x), (elementwise((8, 4, 4), 3), lambda x, w: 3 * x)):
        module = WorkModule(work, batch=2, dtype=torch.float32, device=torch.device("cpu"))
        (x,) = module.inputs()
        (output,) = module(x)
        torch.testing.assert_close(output, expected(x, list(module.weights)))
        assert output is not x


# -- resolving a rule -------------------------------------------------------------------

def test_the_default_target_is_the_inputs_device_and_batch_and_dtype():
    rule = cost_rule("latency", example_inputs=(rand(4, 3, 8, 8).half(),))
    assert isinstance(rule, LatencyCost) and not isinstance(rule, MeasuredCost)
    assert (rule.batch, rule.dtype, rule.profile.device) == (4, "float16", "cpu")
    assert cost_rule("latency", batch=64, precision="bf16", example_inputs=(rand(1, 3),)).batch == 64
    assert isinstance(cost_rule("macs", target="cuda:h200"), MacsCost)


@pytest.mark.parametrize("kwargs, message", [
    ({"cost": "flops"}, "cost must be one of"),
    ({"target": "cuda:h300"}, "known: a100, h100, h200"),
    ({"target": "tpu"}, "target must be"),
    ({"batch": 0}, "batch must be a positive int"),
    ({"cost": "measure", "target": "cuda:a100"}, "use cost='latency' to plan for it"),
    ({"max_param_growth": 0.5}, "max_param_growth must be a finite number >= 1 or None"),
])
def test_bad_planning_arguments_are_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message) as error:
        repfx.explain(block(), (rand(2, 16, 8, 8),), **kwargs)
    assert "\n" not in str(error.value)


def test_the_runtime_a_rule_plans_for_is_checked():
    """compile/export pass the runtime their backend declares; a runtime named that no backend declares is one
    line, not eager's profile by default (a backend's name is not its runtime's)."""
    from repfx.backends import runtime_named

    with pytest.raises(ValueError, match="runtime must be one of eager, inductor, onnxruntime, got 'onnx'"):
        runtime_named("onnx")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: target='cuda' would measure it")
def test_cuda_without_a_gpu_says_to_name_one():
    with pytest.raises(ValueError, match="name the GPU to plan for, e.g. target='cuda:h200'"):
        device_profile("cuda")


def test_published_profiles_are_derated_tensor_core_figures():
    h200, h100 = published_profile("h200"), published_profile("H100")
    assert h200.device == "cuda" and h200.rate("float16") == 2 * h200.rate("float32")
    assert h200.bandwidth > h100.bandwidth and h200.rate("float32") == h100.rate("float32")
    assert "published" in h200.source and published_profile("4090").name == "cuda:rtx4090"


# -- measuring and caching a profile -------------------------------------------------------

def test_measured_cpu_profile_has_positive_rates():
    profile = measure_profile("cpu")
    assert profile.device == "cpu" and profile.rate("float32") > 0 and profile.bandwidth > 0
    assert 0 < profile.overhead_s < 0.1 and 0 < profile.conv_output_s < 1e-6
    assert profile.busy or "measured" in profile.source  # under xdist the other worker may make it busy


def test_cache_measures_once_then_reads(tmp_path, monkeypatch):
    monkeypatch.setenv("REPFX_CACHE_DIR", str(tmp_path))
    calls = []
    measure = lambda: calls.append(1) or LAUNCH_BOUND  # noqa: E731
    assert cached_profile("key", measure) == LAUNCH_BOUND and cached_profile("key", measure) == LAUNCH_BOUND
    assert len(calls) == 1
    stored = json.loads((tmp_path / FILE_NAME).read_text())
    assert stored["written_by"] == MARK and stored["profiles"]["key"]["name"] == "launch-bound"


@pytest.mark.parametrize("content", ["not json {", json.dumps({"profiles": {}}), json.dumps([1, 2])])
def test_a_cache_file_repfx_did_not_write_is_never_overwritten(tmp_path, monkeypatch, content):
    monkeypatch.setenv("REPFX_CACHE_DIR", str(tmp_path))
    (tmp_path / FILE_NAME).write_text(content)
    with pytest.warns(UserWarning, match="not stored"):
        assert cached_profile("key", lambda: COMPUTE_BOUND) == COMPUTE_BOUND
    assert (tmp_path / FILE_NAME).read_text() == content


def test_a_bad_cached_entry_is_measured_again(tmp_path, monkeypatch):
    monkeypatch.setenv("REPFX_CACHE_DIR", str(tmp_path))
    (tmp_path / FILE_NAME).write_text(json.dumps({"written_by": MARK, "profiles": {"key": {"name": "x"}}}))
    with pytest.warns(UserWarning, match="measuring again"):
        assert cached_profile("key", lambda: COMPUTE_BOUND) == COMPUTE_BOUND
    assert json.loads((tmp_path / FILE_NAME).read_text())["profiles"]["key"]["name"] == "compute-bound"


def test_a_busy_machine_gives_an_estimate_that_is_not_cached(tmp_path, monkeypatch):
    """Two threads slower than one (stalled barriers): the profile comes from one thread, flagged, not stored."""
    from repfx.targets import microbench
    from repfx.targets.microbench import Figures

    monkeypatch.setenv("REPFX_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(torch, "set_num_threads", lambda threads: None)
    results = iter([Figures({"float32": 1e9}, 1e9, 1e-2, 1e-8), Figures({"float32": 5e10}, 2e9, 2e-5, 1e-9)])
    monkeypatch.setattr(microbench, "_measure", lambda device, dtypes: next(results))
    with pytest.warns(UserWarning, match="not cached"):
        profile = cached_profile("key", lambda: microbench.measure_profile("cpu"))
    assert profile.busy and profile.rate("float32") == 1e11 and profile.overhead_s == 2e-5  # 2 threads, then 1
    assert profile.conv_output_s == 5e-10
    assert not (tmp_path / FILE_NAME).exists()


def test_remeasuring_replaces_the_cached_profile(tmp_path, monkeypatch):
    import repfx.targets as targets

    monkeypatch.setenv("REPFX_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(targets, "measure_profile", lambda device: LAUNCH_BOUND)
    targets.remeasure("cpu")
    monkeypatch.setattr(targets, "measure_profile", lambda device: COMPUTE_BOUND)
    assert targets.remeasure("cpu") == COMPUTE_BOUND
    assert list(json.loads((tmp_path / FILE_NAME).read_text())["profiles"].values())[0]["name"] == "compute-bound"
    targets._measured.cache_clear()  # the next test must see the session's pinned profile again


@pytest.mark.parametrize("argv, message", [
    (["--target", "cuda:h300"], "known: a100, h100, h200"),
    (["--batch", "0"], "expected a positive integer"),
    (["--cost", "flops"], "invalid choice"),
    (["--rtol", "nan"], "expected a finite number >= 0"),
    (["--atol", "-1"], "expected a finite number >= 0"),
    (["--rtol", "tight"], "expected a number >= 0"),
    (["--max-param-growth", "0.5"], "expected a number >= 1 or 'none'"),
])
def test_cli_planning_arguments_are_checked_before_any_work(argv, message, capsys):
    from repfx.cli import demo, trt

    for main in (demo.main, trt.main):
        with pytest.raises(SystemExit) as exit_:
            main(argv + (["--sample", "repvgg_a0", "--out", "never-written"] if main is trt.main else []))
        assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_every_rule_but_always_carries_the_parameter_bound():
    from repfx.cli.planning import add_planning_arguments

    assert cost_rule("latency", target=LAUNCH_BOUND).max_param_growth == 4.0
    assert cost_rule("macs", max_param_growth=2).max_param_growth == 2
    assert cost_rule("latency", target=LAUNCH_BOUND, max_param_growth=None).max_param_growth is None
    assert cost_rule("always", max_param_growth=2).max_param_growth is None  # every exact merge, whatever its size
    parser = argparse.ArgumentParser()
    add_planning_arguments(parser)
    assert parser.parse_args([]).max_param_growth == 4.0
    assert parser.parse_args(["--max-param-growth", "none"]).max_param_growth is None
    assert parser.parse_args(["--max-param-growth", "8"]).max_param_growth == 8.0


class DepthwiseThenPointwiseBN(nn.Module):
    """dw3x3-BN -> 1x1-BN (RepViT's and FastViT's downsampling): merged, one dense 3x3."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.dw, self.pw = conv_bn(channels, channels, 3, padding=1, groups=channels), conv_bn(channels, channels, 1)

    def forward(self, x):
        return self.pw(self.dw(x))


class TwoBlocks(nn.Module):
    """Two dw3x3 -> 1x1 blocks, the first followed by a widening 1x1 (a chain of three convs) and a ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.narrow, self.up = DepthwiseThenPointwiseBN(4), nn.Conv2d(4, 64, 1)
        self.wide = DepthwiseThenPointwiseBN(64)

    def forward(self, x):
        return self.wide(torch.relu(self.up(self.narrow(x))))


def test_the_report_keeps_one_decision_per_block_and_only_those_that_decided():
    """Both regions are refused whole, so the op-by-op analysis decides them; it walks the whole graph and
    notes merges that decided nothing (one came out "merged" though nothing merged). One decision per
    region is reported, each as the graph shows it."""
    middle = DeviceProfile("middle", "cpu", {"float32": 1e10}, bandwidth=1e11, overhead_s=2e-5)
    model, x = build(TwoBlocks), rand(2, 4, 8, 8)
    gm, report = reparam(model, x, target=middle)
    assert_matches(model, gm, x)
    assert_ops(gm, x, convolution=1 + 1 + 2, batch_norm=0)
    assert [(d["where"], d["merged_won"]) for d in report.decisions] == [("conv2d_4", False), ("conv2d_2", False)]


class GroupedBranchesWithIdentity(nn.Module):
    """3x3 g4-BN + 1x1 g2-BN + identity BN: merged, one 3x3 g2 (the groups' gcd) with twice the 3x3's MACs."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.big = conv_bn(channels, channels, 3, padding=1, groups=4)
        self.small = conv_bn(channels, channels, 1, groups=2)
        self.identity = nn.BatchNorm2d(channels)

    def forward(self, x):
        return self.big(x) + self.small(x) + self.identity(x)


def test_a_contested_merge_competes_with_the_region_kept_apart_not_as_written():
    """Priced against the region as written (three BNs, two adds: seven ops), the 3x3 g2 looks cheaper
    (256 us vs 289 us on this profile); but kept apart the BNs fold and the identity joins the 1x1 for free,
    leaving two convs and one add (204 us). That is what the merge competes with, so it is refused."""
    middle = DeviceProfile("middle", "cpu", {"float32": 1e10}, bandwidth=1e12, overhead_s=2e-5)
    model, x = build(lambda: GroupedBranchesWithIdentity(32)), rand(1, 32, 16, 16)
    gm, report = reparam(model, x, target=middle)
    assert_matches(model, gm, x)
    assert_ops(gm, x, convolution=2, batch_norm=0, add=1)
    (decision,) = report.decisions
    assert not decision["merged_won"]
    assert decision["apart"] == "3x3 32->32 g4 + 1x1 32->32 g2 + elementwise x2"
    assert decision["apart_cost"] == pytest.approx(2 * (32 * 8 * 9 + 32 * 16) * 256 / 1e10 + 3 * 2e-5, rel=0.05)
    refusal = next(r.reason for r in report.refusals if r.reason.startswith("cost rule: merging this region"))
    assert "0.2559 ms vs 0.2058 ms cut where each merge pays" in refusal  # the times of the forms compared
    always, _ = reparam(model, x, cost="always")
    assert_ops(always, x, convolution=1, add=0)


class ParallelThenPointwise(nn.Module):
    """(dw3x3-BN + 1x1-BN) -> widening 1x1: two contested merges in one region (the sum into a dense 3x3,
    then the 1x1 through it into a 3x3 four times as wide)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.dw = conv_bn(channels, channels, 3, padding=1, groups=channels)
        self.pw, self.out = conv_bn(channels, channels, 1), nn.Conv2d(channels, 4 * channels, 1)

    def forward(self, x):
        return self.out(self.dw(x) + self.pw(x))


def test_a_region_merged_step_by_step_reports_every_step():
    """Launch-bound, the careful analysis merges the region as far as the whole merge does, so the merge
    itself compares nothing: the single merges decided it, and all of them are reported."""
    model, x = build(lambda: ParallelThenPointwise(8)), rand(2, 8, 8, 8)
    gm, report = reparam(model, x, target=LAUNCH_BOUND, max_param_growth=None)  # time alone decides here
    assert_matches(model, gm, x)
    assert_ops(gm, x, convolution=1, batch_norm=0, add=0)
    assert len(report.decisions) == 2 and all(d["merged_won"] for d in report.decisions)
