"""The report scales to real models: repeated refusals are grouped, and nothing is lost in ``to_dict``."""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from repfx.report import KeptOp, Refusal, Report


def _residual_refusals(count: int) -> list[Refusal]:
    return [Refusal(f"add_{i}", f"branches read different tensors (relu_{i}, conv2d_{i}); kept as separate terms",
                    "different-inputs") for i in range(count)]


def test_repeated_reasons_print_as_one_line_with_a_few_nodes():
    refusals = _residual_refusals(140) + [Refusal("conv2d", "cost rule: merged op needs 1,234 MACs per sample", "cost")]
    text = str(Report("net", refusals=refusals))
    section = text.split("refused (141):\n")[1].splitlines()
    assert section[0].startswith("  140x branches read different tensors")
    assert section[0].endswith("[add_0, add_1, add_2 and 137 more]")
    assert section[1] == "  conv2d: cost rule: merged op needs 1,234 MACs per sample"
    assert len(section) == 2


def test_every_refusal_stays_in_the_dict():
    refusals = _residual_refusals(5)
    assert Report("net", refusals=refusals).to_dict()["refusals"] == [
        {"node": r.node, "reason": r.reason, "code": "different-inputs", "module": ""} for r in refusals]


def test_refusals_group_by_code_not_by_their_wording_and_show_module_paths():
    refusals = [Refusal("add_3", "output also used by add_4", "shared-output", "stages.0.fuse"),
                Refusal("add_9", "output also used by mul_2; not merged", "shared-output", "stages.1.fuse"),
                Refusal("cat", "a sentence with the same words (shared-output)", "channels")]
    section = str(Report("net", refusals=refusals)).split("refused (3):\n")[1].splitlines()
    assert section[0].startswith("  2x an op's output is also read outside the region (shared-output)")
    assert section[0].endswith("[stages.0.fuse, stages.1.fuse]")
    assert section[1] == "  cat: a sentence with the same words (shared-output)"


def test_every_report_field_has_a_way_into_the_report_of_a_model_folded_in_parts():
    """A field with neither a declared policy nor a default ``absorb`` knows how to merge would be dropped."""
    import dataclasses

    from repfx.report import PARTS

    for spec in dataclasses.fields(Report):
        default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
        assert PARTS in spec.metadata or isinstance(default, (list, dict, int, float, type(None))), spec.name


def test_absorb_names_nodes_inside_the_part_and_adds_its_proofs():
    from repfx.verify.local import ProofSummary

    whole = Report("Detector", local_proofs=ProofSummary(regions_proven=2, input_sets=2, worst_relative_error=1e-15))
    part = Report("Backbone", refusals=[Refusal("add_1", "why")], notes=["n"], buffers_written=["step"],
                  verification_note="accepted", decisions=[{"where": "conv2d"}], iterations=3,
                  local_proofs=ProofSummary(regions_proven=1, input_sets=2, worst_relative_error=1e-14))
    whole.absorb("backbone", part)
    assert whole.refusals == [Refusal("backbone/add_1", "why", module="backbone")]
    assert whole.notes == ["backbone: n", "backbone: accepted"] and whole.buffers_written == ["backbone.step"]
    assert whole.decisions == [{"where": "backbone/conv2d"}] and whole.iterations == 3
    assert (whole.local_proofs.regions_proven, whole.local_proofs.worst_relative_error) == (3, 1e-14)
    assert whole.model == "Detector"


def _kept_ops() -> list[KeptOp]:
    left = [KeptOp(f"batch_norm_{i}", "batch_norm", "nothing-to-fold", f"batch_norm_{i} reads relu_{i}",
                   f"stages.{i}.bn") for i in range(4)]
    norm = [KeptOp(name, "affine", "normalization", f"{name} is part of a normalization", "stem.norm")
            for name in ("add", "mul", "add_1")]
    refused = [KeptOp("pad", "pad", "padding-mode", "pad: reflect padding is not zero padding", "stem.pad", "pad")]
    return left + norm + refused


def test_ops_left_as_written_print_one_line_per_reason_apart_from_those_refused_merges_keep():
    text = str(Report("net", kept_ops=_kept_ops()))
    section = text.split("left as written (7 of the 8 BatchNorm/affine/pad/pool/parameter ops still executed):\n")[1]
    lines = section.splitlines()
    assert lines[0].startswith("  4 batch_norm: no conv or linear on either side to fold into")
    assert lines[0].endswith("(nothing-to-fold)  [stages.0.bn, stages.1.bn, stages.2.bn and 1 more]")
    assert lines[1].startswith("  3 affine: part of a normalization") and lines[1].endswith("[stem.norm]")
    assert lines[2:] == ["kept by refused merges (1):",
                         "  stem.pad: pad: reflect padding is not zero padding (padding-mode)"]
    assert "left as written" not in str(Report("net"))  # nothing kept, no section


def test_every_kept_op_stays_in_the_dict_and_a_part_names_its_nodes_inside_it():
    kept = _kept_ops()
    assert Report("net", kept_ops=kept).to_dict()["kept_ops"][-1] == {
        "node": "pad", "kind": "pad", "code": "padding-mode", "reason": kept[-1].reason, "module": "stem.pad",
        "refused_at": "pad"}
    whole = Report("Detector")
    whole.absorb("backbone", Report("Backbone", kept_ops=kept))
    assert whole.kept_ops[-1] == replace(kept[-1], node="backbone/pad", module="backbone.stem.pad",
                                         refused_at="backbone/pad")
    assert whole.kept_ops[0].refused_at == ""  # left as written: no refusal to name


def test_an_exact_zero_error_prints_without_a_minus_sign():
    """A plain graph that computes bit for bit what the model does (ECBSR in eval) has error 0, never -0."""
    from repfx.verify.numeric import difference

    y = torch.randn(2, 3)
    zero = difference(y, y.clone())
    assert zero == 0.0 and math.copysign(1.0, zero) == 1.0
    text = str(Report("net", max_abs_error=-0.0, max_rel_error=-0.0, tolerance=1e-4))
    assert "max |error| 0.000e+00, relative 0.000e+00" in text and "-0.000" not in text
