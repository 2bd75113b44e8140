"""The report scales to real models: repeated refusals are grouped, and nothing is lost in ``to_dict``."""

from __future__ import annotations

from repfx.report import Refusal, Report


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
