"""Partial capture: models torch.export cannot capture whole are folded in their largest capturable parts.

The hand-made ``Detector`` has what detection models have: a RepVGG-style backbone returning
a dict, a head shared by two feature levels (two shapes, once with a keyword argument,
returning a dict holding a list), a submodule that cannot be captured itself (``.item()``)
around one that can, and a forward that ends in data-dependent Python (``if`` on a tensor,
a loop over ``nonzero()`` results). torchvision's Faster R-CNN and SSDlite are the real
thing (slow: each is folded once per module, by a fixture).

Every model is built under a seed with every BatchNorm randomized; results are compared with
the eval model as given, with a tolerance relative to the output magnitude.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import repfx
import repfx.cli.trt as cli
from repfx.capture.folded_part import FoldedPart
from repfx.pipeline.parts import check_whole
from repfx.report import Report
from repfx.settings import Settings
from repfx.samples import RepVGGBlock
from repfx.verify.local import ProofSummary

from helpers import assert_matches, build, max_error, ops, rand

BLOCKING_LINE = "if scores.max() > 0:"


def conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))


class Backbone(nn.Module):
    """RepVGG-style stages; two feature levels, returned as a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = RepVGGBlock(3, 8, stride=2)
        self.stage1 = RepVGGBlock(8, 8)
        self.stage2 = RepVGGBlock(8, 8, stride=2)
        self.out_channels = 8  # read by whoever holds the backbone

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        p1 = self.stage1(self.stem(x))
        return {"p1": p1, "p2": self.stage2(p1)}


class Refine(nn.Module):
    """Cannot be captured (``.item()`` decides); the block inside it can."""

    def __init__(self) -> None:
        super().__init__()
        self.block = RepVGGBlock(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.abs().mean().item() > 1e6:
            x = x / x.abs().max()
        return self.block(x)


class Head(nn.Module):
    """Shared by both levels; returns a dict holding a list."""

    def __init__(self) -> None:
        super().__init__()
        self.body = conv_bn(8, 8)
        self.score = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor, *, scale: float = 1.0) -> dict:
        y = torch.relu(self.body(x))
        return {"scores": self.score(y) * scale, "embed": [y.mean((2, 3))]}


class Detector(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone, self.refine, self.head = Backbone(), Refine(), Head()

    def forward(self, images: torch.Tensor) -> dict:
        features = self.backbone(images)
        first = self.head(features["p1"])
        scores = first["scores"]
        if scores.max() > 0:
            scores = scores - scores.max()
        second = self.head(self.refine(features["p2"]), scale=0.5)
        picked = [second["scores"][b, :, y, x] for b, _, y, x in (second["scores"] > 0).nonzero().tolist()[:4]]
        return {"scores": scores, "levels": [first, second], "picked": torch.stack(picked),
                "count": torch.tensor(len(picked))}


SHAPE = (2, 3, 32, 32)


@pytest.fixture(scope="module")
def model() -> Detector:
    return build(Detector)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return rand(*SHAPE)


@pytest.fixture(scope="module")
def folded(model, x):
    """(model as it was before, the result, the warnings reparameterize gave)."""
    before = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = repfx.reparameterize(model, (x,))
    return before, result, [str(warning.message) for warning in caught if warning.category is UserWarning]


def test_the_backbone_the_shared_head_and_the_block_inside_refine_fold(folded, x):
    _, result, _ = folded
    report = result.repfx_report
    assert {part.name: (part.calls, part.signatures) for part in report.parts} == {
        "backbone": (1, 1), "head": (2, 2), "refine.block": (1, 1)}
    assert isinstance(result.backbone, FoldedPart) and isinstance(result.head, FoldedPart)
    assert isinstance(result.refine, Refine) and isinstance(result.refine.block, FoldedPart)
    assert ops(result.backbone, (x,))["batch_norm"] == 0
    assert (report.ops_before["batch_norm"], report.ops_after["batch_norm"]) == (12, 0)  # backbone 7, head 2x1, refine 3
    assert report.ops_after["convolution"] < report.ops_before["convolution"]
    assert ops(result, (x,))["batch_norm"] == 0
    assert report.local_proofs.regions_proven >= 5 and report.max_rel_error <= 1e-4
    assert all(rewrite.nodes[0].split("/")[0] in {"backbone", "head", "refine.block"} for rewrite in report.rewrites)


def test_outputs_match_the_model_on_fresh_inputs(folded, model, x):
    _, result, _ = folded
    assert_matches(model, result, (x,), extra_seeds=(7, 8))


def test_the_users_model_is_not_modified(folded, model):
    before, result, _ = folded
    assert result is not model and not model.training
    assert [type(m) for m in model.modules()] == [type(m) for m in before.modules()]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), before.state_dict().values()))


def test_the_report_and_the_warning_name_the_blocking_line_and_each_part_left_as_written(folded):
    _, result, caught = folded
    report = result.repfx_report
    assert BLOCKING_LINE in report.capture_blocker and "test_partial.py" in report.capture_blocker
    kept = {part.name: part.reason for part in report.kept_parts}
    assert "x.abs().mean().item() > 1e6" in kept["refine"]
    assert [message for message in caught if "folded it in parts" in message and BLOCKING_LINE in message]
    text = str(report)
    assert "folded backbone (Backbone" in text and "kept   refine:" in text


def test_the_stand_ins_keep_the_submodules_attributes_and_run_unseen_calls_as_written(folded, model):
    _, result, _ = folded
    assert result.backbone.out_channels == 8
    other = rand(1, 3, 48, 48, seed=3)
    with pytest.warns(UserWarning, match="was not seen, so calls like it run the submodule as written"):
        assert_matches(model, result, (other,), extra_seeds=())


def test_reparameterizing_the_result_again_changes_nothing(folded, x):
    _, result, _ = folded
    with pytest.warns(UserWarning, match="folded it in parts"):
        again = repfx.reparameterize(result, (x,))
    report = again.repfx_report
    assert report.parts == [] and report.rewrites == []
    assert {kept.name for kept in report.kept_parts if kept.reason == "already folded by repfx"} == {
        "backbone", "head", "refine.block"}
    assert ops(again, (x,)) == ops(result, (x,))
    error, allowed = max_error(result(x), again(x))
    assert error <= allowed


def test_partial_false_raises_the_capture_error_as_before(model, x):
    with pytest.raises(repfx.CaptureError, match="could not capture Detector") as caught:
        repfx.reparameterize(model, (x,), partial=False)
    assert BLOCKING_LINE in str(caught.value).splitlines()[0]


def test_explain_reports_the_parts_without_verifying(model, x):
    with pytest.warns(UserWarning, match="folded it in parts"):
        report = repfx.explain(model, (x,))
    assert {part.name for part in report.parts} == {"backbone", "head", "refine.block"}
    assert report.max_abs_error is None and report.ops_after["batch_norm"] == 0


def test_a_dynamic_batch_is_refused_with_the_blocking_line(model, x):
    with pytest.raises(repfx.CaptureError, match="drop dynamic_batch") as caught:
        repfx.reparameterize(model, (x,), dynamic_batch=True)
    assert BLOCKING_LINE in str(caught.value)


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_compile_runs_the_model_folded_in_parts(model, x, backend):
    with pytest.warns(UserWarning, match="folded it in parts"):
        deployed = repfx.compile(model, (x,), backend=backend)
    assert deployed.backend == backend and deployed.report.parts
    assert_matches(model, deployed, (x,))


def test_export_says_in_one_line_what_blocks_it_and_which_part_to_export(model, x, tmp_path):
    with pytest.raises(repfx.CaptureError) as caught:
        repfx.export(model, (x,), tmp_path / "out")
    line = str(caught.value)
    assert "\n" not in line and BLOCKING_LINE in line and "model.backbone (Backbone, called with 2x3x32x32)" in line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_compile_to_a_one_graph_backend_is_refused_the_same_way(model, x):
    with pytest.raises(repfx.CaptureError, match=r"cannot be exported as one graph: .*model\.backbone"):
        repfx.compile(model, (x,), backend="onnx")


def test_the_cli_exits_2_with_one_line_naming_the_blocking_line_and_the_part(model, tmp_path, monkeypatch, capsys):
    path = tmp_path / "detector.pt"
    torch.save(model, path)
    monkeypatch.chdir(tmp_path)
    code = cli.main([str(path), "--trust-pickle", "--input-shape", "x".join(map(str, SHAPE)), "--out", "out",
                     "--quiet"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == cli.EXIT_BAD_INPUT and len(lines) == 1, lines
    assert BLOCKING_LINE in lines[0] and "model.backbone" in lines[0]
    assert not (tmp_path / "out").exists()


# --- the end-to-end mismatch policy (as for a whole graph: repfx.verify.mismatch) ---------------------------------

class Ranked(nn.Module):
    """A conv whose outputs are ranked: a tiny change of the weights reorders near-ties."""

    def __init__(self, select: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 16, 3, padding=1)
        self.select = select

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y.flatten().argsort() if self.select else y


def _perturbed(module: nn.Module, relative: float) -> nn.Module:
    other = copy.deepcopy(module)
    with torch.no_grad():
        other.conv.weight.mul_(1 + relative)
    return other


def _check(given, folded, *, proven=1, strict=False) -> Report:
    report = Report(model="Ranked", local_proofs=ProofSummary(regions_proven=proven, input_sets=2))
    check_whole(report, given, folded, [(rand(1, 4, 32, 32),)], Settings(strict=strict))
    return report


def test_a_difference_after_discontinuous_ops_is_accepted_with_a_warning_and_refused_when_strict():
    given = build(Ranked)
    folded = _perturbed(given, 1e-5)
    with pytest.warns(UserWarning, match="differs from the original beyond tolerance"):
        report = _check(given, folded)
    assert "discontinuous ops (sort)" in report.verification_note and "Accepted" in report.verification_note
    with pytest.raises(repfx.VerificationError, match="strict=True"):
        _check(given, folded, strict=True)
    with pytest.raises(repfx.VerificationError, match="was not returned"):
        _check(given, folded, proven=0)


def test_a_difference_float64_confirms_is_an_error():
    given = build(lambda: Ranked(select=False))
    with pytest.raises(repfx.VerificationError, match="in float64 too"):
        _check(given, _perturbed(given, 1e-2))


# --- torchvision's detectors --------------------------------------------------------------------------------------

# With random weights every Faster R-CNN score is below the default threshold of 0.05: nothing would be compared.
DETECTORS = {"fasterrcnn_mobilenet_v3_large_320_fpn": {"box_score_thresh": 0.0}, "ssdlite320_mobilenet_v3_large": {}}


def image(seed: int) -> torch.Tensor:
    return torch.rand(3, 320, 320, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=sorted(DETECTORS))
def detector(request):
    """(model, its example image, the model folded in parts): folded once per module, it takes a minute or two."""
    detection = pytest.importorskip("torchvision.models.detection", reason="torchvision is not installed")
    model = build(lambda: getattr(detection, request.param)(weights=None, weights_backbone=None,
                                                             **DETECTORS[request.param]))
    example = image(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # folded in parts; SSDlite's reordered near-ties (asserted below)
        result = repfx.reparameterize(model, ([example],))
    return model, example, result


@pytest.mark.slow
def test_every_conv_bn_pair_of_a_torchvision_detector_folds(detector):
    model, example, result = detector
    report = result.repfx_report
    batch_norms = sum(isinstance(module, nn.BatchNorm2d) for module in model.modules())
    assert (report.ops_before["batch_norm"], report.ops_after["batch_norm"]) == (batch_norms, 0)
    assert ops(result, ([example],))["batch_norm"] == 0
    assert report.ops_after["convolution"] <= report.ops_before["convolution"]
    assert "backbone" in {part.name for part in report.parts}
    assert "torchvision/ops/boxes.py" in report.capture_blocker  # NMS blocks the whole model
    kept = {part.name: part.reason for part in report.kept_parts}
    assert "ImageList argument" in kept.get("rpn", "called with a ImageList argument")  # Faster R-CNN's RPN


@pytest.mark.slow
def test_a_torchvision_detector_folded_in_parts_computes_what_it_did(detector):
    """Detections come out of top-k and NMS over scores that, with random weights, are near-ties everywhere
    (SSDlite's are exact ties): fp32 rounding legitimately reorders them. What must hold: the folded parts'
    continuous outputs match on a fresh image, the detections keep their structure, and a whole-model
    difference is the accepted one, explained by those ops."""
    model, _, result = detector
    fresh = image(2)
    with torch.no_grad():
        images, _ = model.transform([fresh])
        features = model.backbone(images.tensors)
        error, allowed = max_error(features, result.backbone(images.tensors))
        assert error <= allowed
        if hasattr(model, "head"):  # SSDlite's head (Faster R-CNN's heads have nothing to fold)
            error, allowed = max_error(model.head(list(features.values())), result.head(list(features.values())))
            assert error <= allowed
        want, got = model([fresh]), result([fresh])
    assert [{key: (value.shape, value.dtype) for key, value in found.items()} for found in got] == [
        {key: (value.shape, value.dtype) for key, value in found.items()} for found in want]
    report = result.repfx_report
    note = report.verification_note
    assert report.max_abs_error <= report.tolerance or ("nms" in note and "Accepted" in note), note


# --- one driver, one report: a model folded in parts reports what a whole graph reports ---------------------------

def test_the_parts_report_keeps_the_cost_rule_and_the_decisions_and_the_warning_points_at_the_caller(model, x):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = repfx.explain(model, (x,), cost="always")
    assert report.cost_rule == "MACs"  # a part's rule is the model's rule: lost before the one driver
    assert isinstance(report.decisions, list)
    assert [w.filename for w in caught if "folded it in parts" in str(w.message)] == [__file__]


def test_parameters_mean_the_tensors_the_model_reads_on_both_paths(model, x, folded):
    _, result, _ = folded
    report = result.repfx_report
    unused = nn.Linear(100, 100)  # a submodule the forward never calls holds no parameter the model reads
    wider = copy.deepcopy(model)
    wider.unused = unused
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = repfx.explain(wider, (x,)).parameters_before
    assert again == report.parameters_before > 0


def test_a_new_report_field_survives_the_whole_path_and_the_parts_path(model, x, monkeypatch):
    """``Report.absorb`` merges field by field: a field added tomorrow cannot be forgotten by the parts path."""
    import dataclasses

    import repfx.pipeline.graph as graph
    import repfx.pipeline.parts as parts

    @dataclasses.dataclass
    class Extended(Report):
        extra: list = dataclasses.field(default_factory=list)

    real = graph.fold_captured

    def fold_captured(captured, inputs, settings, report, laps):
        extended = Extended(**{f.name: getattr(report, f.name) for f in dataclasses.fields(report)})
        real(captured, inputs, settings, extended, laps)
        extended.extra.append("seen")
        for f in dataclasses.fields(report):
            setattr(report, f.name, getattr(extended, f.name))
        report.__class__ = Extended
        report.extra = extended.extra
        return report

    monkeypatch.setattr(graph, "fold_captured", fold_captured)
    monkeypatch.setattr(parts, "Report", Extended)
    whole = repfx.explain(build(lambda: conv_bn(4, 4)), (rand(1, 4, 8, 8),))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        in_parts = repfx.explain(model, (x,))
    assert whole.extra == ["seen"]
    assert len(in_parts.extra) == sum(part.signatures for part in in_parts.parts) > 1


# --- several example input sets (issue 16 item 9) ------------------------------------------------------------------

class DayNight(nn.Module):
    """A forward that branches on the data: one example input reaches one branch only."""

    def __init__(self) -> None:
        super().__init__()
        self.day = RepVGGBlock(4, 4)
        self.night = RepVGGBlock(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0:  # data-dependent: torch.export cannot capture it whole
            return self.day(x)
        return self.night(x)


def test_two_example_input_sets_fold_both_branches_of_a_data_dependent_forward():
    model = build(DayNight)
    bright, dark = rand(1, 4, 16, 16).abs() + 1, -rand(1, 4, 16, 16).abs() - 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = repfx.reparameterize(model, (bright,))
        both = repfx.reparameterize(model, [(bright,), (dark,)])
    assert [part.name for part in one.repfx_report.parts] == ["day"]
    assert [(kept.name, kept.reason) for kept in one.repfx_report.kept_parts] == [
        ("night", "not called on the example inputs")]
    assert sorted(part.name for part in both.repfx_report.parts) == ["day", "night"]
    assert both.repfx_report.kept_parts == []
    for x in (bright, dark):
        assert_matches(both, model, x)
        assert ops(both, x)["batch_norm"] == 0 and ops(both, x)["convolution"] == 1


def test_example_input_sets_that_one_graph_cannot_hold_fold_in_parts_and_a_program_says_why():
    block = build(lambda: RepVGGBlock(4, 4))
    small, large = rand(1, 4, 8, 8), rand(1, 4, 16, 16)
    with pytest.warns(UserWarning, match="folded it in parts"):
        folded = repfx.reparameterize(nn.Sequential(block), [(small,), (large,)])
    assert folded.repfx_report.parts[0].signatures == 2
    assert_matches(folded, block, large)
    with pytest.raises(repfx.CaptureError, match="example input set 2 differs in structure or shape"):
        repfx.reparameterize(torch.export.export(block, (small,)), [(small,), (large,)])
    gm = repfx.reparameterize(block, [(small,), (rand(3, 4, 8, 8),)], dynamic_batch=True)  # batch may differ
    assert gm.repfx_report.parts == [] and ops(gm, rand(5, 4, 8, 8))["convolution"] == 1
