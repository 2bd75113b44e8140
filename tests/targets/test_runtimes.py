"""The runtime a model is deployed to has a profile of its own: ONNX Runtime pays less per op than eager PyTorch.

Decisions here are taken under profiles written into a temporary cache, so they
cannot flake; the one real ONNX Runtime measurement asserts only what it measured.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from torch.nn import functional as F

from helpers import COMPUTE_BOUND, LAUNCH_BOUND, DepthwiseBesideDense, assert_matches, assert_ops, build, rand

import repfx
import repfx.targets as targets
from repfx.backends import onnx_profile as bench, runtime_named
from repfx.backends.onnx import cpu_session
from repfx.targets import cost_rule
from repfx.targets.cache import FILE_NAME, MARK
from repfx.targets.microbench import Figures, cache_key

ONNXRUNTIME, INDUCTOR = runtime_named("onnxruntime"), runtime_named("inductor")


@pytest.fixture
def eager_launch_bound_onnxruntime_compute_bound(tmp_path, monkeypatch):
    """A cache where eager PyTorch is launch-bound (merge) and ONNX Runtime compute-bound (keep apart)."""
    profiles = {cache_key("cpu"): LAUNCH_BOUND.to_dict(), cache_key("cpu", runtime=ONNXRUNTIME): COMPUTE_BOUND.to_dict()}
    (tmp_path / FILE_NAME).write_text(json.dumps({"written_by": MARK, "profiles": profiles}))
    monkeypatch.setenv("REPFX_CACHE_DIR", str(tmp_path))
    targets._measured.cache_clear()
    yield
    targets._measured.cache_clear()  # later tests see the session's pinned profiles again


def test_the_onnx_backend_plans_with_onnxruntimes_profile(eager_launch_bound_onnxruntime_compute_bound):
    model, x = build(lambda: DepthwiseBesideDense(16)), rand(2, 16, 8, 8)
    # The merge turns a depthwise 3x3 dense (5.8x the parameters): unbounded here, where the runtime is the subject.
    eager = cost_rule("latency", example_inputs=(x,), max_param_growth=None)
    onnxruntime = cost_rule("latency", example_inputs=(x,), runtime=ONNXRUNTIME, max_param_growth=None)
    assert eager.profile == LAUNCH_BOUND and onnxruntime.profile == COMPUTE_BOUND
    for rule, convolutions in ((eager, 1), (onnxruntime, 2)):
        gm = repfx.reparameterize(model, (x,), cost=rule)
        assert_matches(model, gm, x)
        assert_ops(gm, x, convolution=convolutions, batch_norm=0)
    deployed = repfx.compile(model, (x,), backend="onnx")
    assert "compute-bound" in deployed.report.cost_rule
    assert_ops(deployed.plain, x, convolution=2, batch_norm=0)
    torch.testing.assert_close(deployed(x), model(x), rtol=1e-4, atol=1e-4)


def test_inductor_plans_with_eagers_profile(eager_launch_bound_onnxruntime_compute_bound):
    x = rand(2, 16, 8, 8)
    assert cost_rule("latency", example_inputs=(x,), runtime=INDUCTOR).profile == LAUNCH_BOUND


def test_the_profile_graphs_compute_what_they_say():
    """The chain the overhead is read from runs ``count`` same-padded convolutions, as torch computes them."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 6, 6), dtype=np.float32)
    weight = rng.standard_normal((4, 4, 3, 3), dtype=np.float32) / 6
    model = bench._conv_graph(x.shape, weight, 3)
    onnx.checker.check_model(onnx.load_from_string(model))
    (got,) = cpu_session(model, threads=1).run(None, {"X": x})
    expected = torch.from_numpy(x)
    for _ in range(3):
        expected = F.conv2d(expected, torch.from_numpy(weight), padding=1)
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-5)
    a, b = (rng.standard_normal(8, dtype=np.float32) for _ in range(2))
    (total,) = cpu_session(bench._add_graph(a.shape), threads=1).run(None, {"X": a, "Z": b})
    np.testing.assert_allclose(total, a + b)


def test_onnxruntime_profile_is_measured_in_onnxruntime():
    profile = bench.measure_onnxruntime_profile(cpu_session)
    assert profile.device == "cpu" and "onnxruntime" in profile.name
    assert profile.rate("float32") > 0 and profile.bandwidth > 0 and 0 < profile.overhead_s < 0.1
    assert 0 < profile.conv_output_s < 1e-6
    assert profile.busy or profile.source.startswith("measured in onnxruntime")


def test_a_busy_machine_gives_an_onnxruntime_estimate_that_is_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("REPFX_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    measured = {0: Figures({"float32": 1e9}, 1e9, 1e-2, 1e-8),  # the default pool
                1: Figures({"float32": 5e10}, 2e9, 3e-6, 1e-9)}  # one thread
    monkeypatch.setattr(bench, "_measure", lambda session, threads: measured[threads])
    targets._measured.cache_clear()
    try:
        with pytest.warns(UserWarning, match="not cached"):
            profile = targets.device_profile("cpu", runtime=ONNXRUNTIME)
    finally:
        targets._measured.cache_clear()
    assert profile.busy and profile.rate("float32") == 1e11 and profile.overhead_s == 3e-6
    assert not (tmp_path / FILE_NAME).exists()


def test_an_unknown_runtime_is_one_line():
    with pytest.raises(ValueError, match="runtime must be one of eager, inductor, onnxruntime, got 'tvm'"):
        runtime_named("tvm")


def test_cli_shows_the_onnxruntime_profile(capsys):
    from repfx.targets.__main__ import main

    assert main(["--runtime", "onnxruntime"]) == 0
    assert "pinned for tests" in capsys.readouterr().out
