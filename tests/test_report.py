"""The report scales to real models: repeated refusals are grouped, and nothing is lost in ``to_dict``."""

from __future__ import annotations

from repfx.report import Refusal, Report, reason_kind


def _residual_refusals(count: int) -> list[Refusal]:
    return [Refusal(f"add_{i}", f"branches read different tensors (relu_{i}, conv2d_{i}); kept as separate terms")
            for i in range(count)]


def test_repeated_reasons_print_as_one_line_with_a_few_nodes():
    refusals = _residual_refusals(140) + [Refusal("conv2d", "cost rule: merged op needs 1,234 MACs per sample")]
    text = str(Report("net", refusals=refusals))
    section = text.split("refused (141):\n")[1].splitlines()
    assert section[0].startswith("  140x branches read different tensors")
    assert section[0].endswith("[add_0, add_1, add_2 and 137 more]")
    assert section[1] == "  conv2d: cost rule: merged op needs 1,234 MACs per sample"
    assert len(section) == 2


def test_every_refusal_stays_in_the_dict():
    refusals = _residual_refusals(5)
    assert Report("net", refusals=refusals).to_dict()["refusals"] == [
        {"node": r.node, "reason": r.reason} for r in refusals]


def test_reason_kind_ignores_names_and_numbers_but_not_the_reason():
    assert reason_kind("output also used by add_3; not merged into conv2d_5") == \
        reason_kind("output also used by add_14; not merged into conv2d_20")
    assert reason_kind("cost rule: 1,234 MACs vs 999 (1.24x)") == reason_kind("cost rule: 7 MACs vs 5 (1.40x)")
    assert reason_kind("output also used by add_3; not merged into conv2d_5") != \
        reason_kind("branches read different tensors (a, b); kept as separate terms")
