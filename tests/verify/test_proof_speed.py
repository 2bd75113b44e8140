"""The per-region proofs, run once over the graph for every input set together, prove what they proved
one input set at a time.

* a fold that is right on the example inputs but wrong on the seeded ones is refused, and the report
  names the seeded input set;
* one wrong fold among several is refused alone; the others are proven on every input set;
* a graph that fails to run on some input set proves nothing there, and says so;
* state the graph writes (a step counter) is never advanced by the proofs;
* the fast ``difference`` and ``magnitude`` agree with their masked definitions, inf and NaN included.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from repfx import samples
from repfx.capture.export import capture
from repfx.passes import emit, run_pipeline
from repfx.verify.local import LocalProver
from repfx.verify.numeric import difference, input_sets, magnitude

from helpers import assert_matches, assert_ops, build, rand, reparam

C = 8


def _corrupt_weights(monkeypatch, corrupt) -> None:
    """Every emitted conv weight (its exact float64 value too) passes through ``corrupt``."""
    real = emit.Emitter._constant

    def constant(self, out, kind, value, dtype):
        return real(self, out, kind, corrupt(out.root, value) if kind == "weight" else value, dtype)

    monkeypatch.setattr(emit.Emitter, "_constant", constant)


def test_a_fold_wrong_only_on_the_seeded_inputs_is_refused_naming_that_input_set(monkeypatch):
    """Input channel 0 is zero in the example inputs, so a fold wrong only in what it reads from
    channel 0 agrees there; the seeded input set (1) refutes it."""
    def corrupt(root, value):
        value = value.clone()
        value[:, 0] += 0.25
        return value

    _corrupt_weights(monkeypatch, corrupt)
    model = build(lambda: samples.RepVGGBlock(C, C))
    x = rand(2, C, 12, 12)
    x[:, 0] = 0
    gm, report = reparam(model, x)
    assert report.rewrites == []
    failures = [r.reason for r in report.refusals if r.reason.startswith("local proof failed")]
    assert failures and all("on input set 1:" in reason for reason in failures), failures
    assert report.local_proofs.regions_failed == 1
    assert_ops(gm, x, convolution=2, batch_norm=3)
    assert_matches(model, gm, x)


def test_one_wrong_fold_among_several_is_refused_alone(monkeypatch):
    model = build(lambda: nn.Sequential(*(samples.RepVGGBlock(C, C) for _ in range(3))))
    x = rand(1, C, 12, 12)
    victim = []

    def corrupt(root, value):
        if not victim:
            victim.append(root.name)
        return value + 0.25 if root.name == victim[0] else value

    _corrupt_weights(monkeypatch, corrupt)
    gm, report = reparam(model, x)
    proofs = report.local_proofs
    assert proofs.regions_proven == 2 and proofs.input_sets == 2
    assert proofs.regions_failed == 2, "the region kept as written is emitted and refuted again in the second round"
    assert [r.node for r in report.refusals if r.reason.startswith("local proof failed on input set 0")] == victim
    assert_ops(gm, x, convolution=2 + 2, batch_norm=3)
    assert_matches(model, gm, x)


def test_a_graph_that_fails_on_one_input_set_proves_nothing_there():
    """The second input set has the wrong channel count: the graph cannot run on it."""
    model = build(lambda: samples.RepVGGBlock(C, C))
    x = rand(1, C, 12, 12)
    gm = capture(model, (x,)).graph
    prover = LocalProver([(x,), (rand(1, C + 1, 12, 12),)])
    rounds = run_pipeline(gm, "macs", prover=prover)
    assert not any(step.rewrites for step in rounds)
    reasons = [r.reason for step in rounds for r in step.refusals if r.code == "local-proof"]
    assert reasons
    assert all(reason.startswith("local proof not possible: running the graph failed") for reason in reasons)
    assert prover.summary.regions_failed == 1 and prover.summary.regions_proven == 0
    assert 0 < prover.summary.worst_relative_error <= 1e-9, "the first input set was still checked"


class CountingRepVGG(nn.Module):
    """A RepVGG block that counts its calls in a buffer, as some detectors count steps."""

    def __init__(self) -> None:
        super().__init__()
        self.block = samples.RepVGGBlock(C, C)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.step += 1
        return self.block(x) * 1.0


def test_proofs_never_advance_state_the_graph_writes():
    model = build(CountingRepVGG)
    x = rand(1, C, 12, 12)
    gm = capture(model, (x,)).graph
    step = next(name for name, _ in gm.named_buffers() if name.endswith("step"))
    prover = LocalProver(input_sets((x,), 3))
    rounds = run_pipeline(gm, "macs", prover=prover)
    assert any(step.rewrites for step in rounds)
    assert prover.summary.regions_proven == 1 and prover.summary.input_sets == 4
    assert int(gm.get_buffer(step)) == 0 and int(model.step) == 0


def _masked_difference(want: torch.Tensor, got: torch.Tensor) -> float:
    """The definition: equal non-finite values agree, any other non-finite pair is infinitely apart."""
    want, got = want.double(), got.double()
    finite = torch.isfinite(want) & torch.isfinite(got)
    same = ~finite & ((want == got) | (torch.isnan(want) & torch.isnan(got)))
    if not bool((finite | same).all()):
        return math.inf
    return (want[finite] - got[finite]).abs().max().item() if bool(finite.any()) else 0.0


def _masked_magnitude(tensor: torch.Tensor) -> float:
    finite = tensor[torch.isfinite(tensor)]
    return max(1.0, finite.double().abs().max().item()) if finite.numel() else 1.0


SPECIAL = {"finite": None, "inf": math.inf, "-inf": -math.inf, "nan": math.nan}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("in_want, in_got", [("finite", "finite"), ("inf", "inf"), ("inf", "-inf"), ("nan", "nan"),
                                             ("nan", "finite"), ("finite", "inf"), ("-inf", "-inf")])
def test_fast_difference_and_magnitude_agree_with_their_definitions(dtype, in_want, in_got):
    gen = torch.Generator().manual_seed(0)
    want = (torch.randn(64, generator=gen) * 3).to(dtype)
    got = (want.double() + 1e-3 * torch.randn(64, generator=gen, dtype=torch.float64)).to(dtype)
    for tensor, special in ((want, SPECIAL[in_want]), (got, SPECIAL[in_got])):
        if special is not None:
            tensor[[3, 17]] = special
    assert difference(want, got) == _masked_difference(want, got)
    assert magnitude(want) == _masked_magnitude(want)
    assert magnitude(torch.full((4,), math.nan, dtype=dtype)) == 1.0
    assert difference(want[:0], got[:0]) == 0.0 and magnitude(want[:0]) == 1.0
