"""What a re-parameterization did, in a form for people (``print``) and programs (``to_dict``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from repfx.capture.model_state import ModeChange, grouped_mode_changes
from repfx.passes.cost.rules import amount_text
from repfx.report_groups import grouped_refusals, kept_lines


@dataclass(frozen=True)
class Rewrite:
    kind: str  # e.g. "3 conv + 3 batch_norm + 2 add -> conv 3x3 48->48"
    nodes: tuple[str, ...]  # graph nodes the rewrite replaced
    kernel_shapes: tuple[tuple[int, ...], ...]  # weights of the emitted convolutions / linears
    ops_before: int
    ops_after: int
    module: str = ""  # the innermost module holding every replaced node ("" where torch recorded none)
    params_before: int = 0  # floating elements of the constants the replaced ops read
    params_after: int = 0  # elements of the emitted weights
    growth_note: str = ""  # parameters more than doubled: by how much, and what the merge bought


@dataclass(frozen=True)
class Refusal:
    node: str
    reason: str
    code: str = ""  # repfx.passes.refusals.CODES: what groups refusals in the printed report
    module: str = ""  # the path of the module that ran the node (``stages.2.conv_kxk``), where torch recorded it


@dataclass(frozen=True)
class KeptOp:
    """A BatchNorm, affine, pad, pool or parameter-only op the plain graph still executes, and why it stays."""

    node: str
    kind: str  # "batch_norm", "affine", "pad", "pool" or "parameter-subgraph"
    code: str  # a refusal code (repfx.passes.refusals.CODES: a refused merge) or a LEFT_AS_WRITTEN code
    reason: str
    module: str = ""  # the path of the module that ran it, where torch recorded it
    refused_at: str = ""  # the node whose refusal explains it ("" when left as written)


@dataclass(frozen=True)
class Part:
    """A submodule folded on its own because the whole model could not be captured (``repfx.pipeline.parts``)."""

    name: str  # qualified name in the model, e.g. "backbone.body"
    module: str  # its class
    calls: int  # times the model called it on the example inputs
    signatures: int  # distinct call signatures (shapes, structure, constants): one plain graph each
    inputs: tuple[str, ...]  # the tensor shapes of each signature, e.g. ("1x3x320x320",)
    ops_before: dict[str, int]  # executed over all its calls: convolution, batch_norm, add, total
    ops_after: dict[str, int]
    rewrites: int


@dataclass(frozen=True)
class KeptPart:
    """A submodule left as written when folding in parts, and why (a capture error names the line)."""

    name: str
    reason: str


# How a part's report enters the report of a model folded in parts (``Report.absorb``), per field:
# ``policy(whole, part_report, field_name, part_name)``. A field without a policy is merged by the
# type of its default (lists joined, counts added, dicts added key by key, anything else the first
# value set): a new field is never dropped.
PARTS = "parts"


def _whole() -> dict:
    """The field describes the whole model and is set by the driver, not taken from parts."""
    return {PARTS: lambda whole, report, name, part: None}


def _with_nodes(*attributes: str) -> dict:
    """Entries naming graph nodes name them inside the part (``backbone/convolution_3``), and their module in
    the model (``backbone.conv``)."""
    def absorb(whole: Report, report: Report, name: str, part: str) -> None:
        getattr(whole, name).extend(
            replace(item, **{attribute: _in_part(getattr(item, attribute), part) for attribute in attributes},
                    module=f"{part}.{item.module}" if item.module else part) for item in getattr(report, name))
    return {PARTS: absorb}


def _in_part(nodes: Any, part: str) -> Any:
    if isinstance(nodes, tuple):
        return tuple(f"{part}/{node}" for node in nodes)
    return f"{part}/{nodes}" if nodes else nodes  # "" names no node


def _decisions() -> dict:
    return {PARTS: lambda whole, report, name, part: whole.decisions.extend(
        decision | {"where": f"{part}/{decision['where']}"} for decision in report.decisions)}


def _buffers() -> dict:
    return {PARTS: lambda whole, report, name, part: whole.buffers_written.extend(
        f"{part}.{buffer}" for buffer in report.buffers_written)}


def _notes() -> dict:
    """A part's notes, then its accepted end-to-end difference, are notes of the whole model."""
    def absorb(whole: Report, report: Report, name: str, part: str) -> None:
        whole.notes.extend(f"{part}: {note}" for note in report.notes)
        if report.verification_note:
            whole.notes.append(f"{part}: {report.verification_note}")
    return {PARTS: absorb}


def _proofs() -> dict:
    def absorb(whole: Report, report: Report, name: str, part: str) -> None:
        mine, theirs = whole.local_proofs, report.local_proofs
        whole.local_proofs = theirs if mine is None or theirs is None else replace(
            mine, regions_proven=mine.regions_proven + theirs.regions_proven,
            regions_failed=mine.regions_failed + theirs.regions_failed,
            input_sets=max(mine.input_sets, theirs.input_sets),
            worst_relative_error=max(mine.worst_relative_error, theirs.worst_relative_error))
    return {PARTS: absorb}


def _largest() -> dict:
    return {PARTS: lambda whole, report, name, part: setattr(whole, name, max(getattr(whole, name),
                                                                             getattr(report, name)))}


@dataclass
class Report:
    model: str = field(metadata=_whole())
    rewrites: list[Rewrite] = field(default_factory=list, metadata=_with_nodes("nodes"))
    refusals: list[Refusal] = field(default_factory=list, metadata=_with_nodes("node"))
    # Every BatchNorm, affine, pad, pool and parameter-only op still executed, with the one reason it stays.
    kept_ops: list[KeptOp] = field(default_factory=list, metadata=_with_nodes("node", "refused_at"))
    # Executed ops: convolution, batch_norm, add, total; of the model as a whole (a part's are in ``parts``).
    ops_before: dict[str, int] = field(default_factory=dict, metadata=_whole())
    ops_after: dict[str, int] = field(default_factory=dict, metadata=_whole())
    # Floating elements of the parameters and buffers the model reads (folded BN statistics vanish, so they count).
    parameters_before: int = field(default=0, metadata=_whole())
    parameters_after: int = field(default=0, metadata=_whole())
    max_abs_error: float | None = field(default=None, metadata=_whole())  # None when verification was skipped
    max_rel_error: float | None = field(default=None, metadata=_whole())
    tolerance: float | None = field(default=None, metadata=_whole())
    # An accepted end-to-end difference and what explains it.
    verification_note: str | None = field(default=None, metadata=_whole())  # a part's: a note
    # repfx.verify.local.ProofSummary: regions proven in float64, worst error.
    local_proofs: Any = field(default=None, metadata=_proofs())
    # Submodules the eval capture switched from train mode.
    mode_changes: list[ModeChange] = field(default_factory=list, metadata=_whole())
    buffers_written: list[str] = field(default_factory=list, metadata=_buffers())  # state the forward updates
    iterations: int = field(default=0, metadata=_largest())
    seconds: dict[str, float] = field(default_factory=dict, metadata=_whole())
    # Set by repfx.compile / repfx.export: where the plain graph was lowered and how it checked out.
    backend: str | None = field(default=None, metadata=_whole())
    precision: str | None = field(default=None, metadata=_whole())
    backend_max_abs_error: float | None = field(default=None, metadata=_whole())  # vs the fp32 plain graph
    backend_tolerance: float | None = field(default=None, metadata=_whole())
    backend_note: str | None = field(default=None, metadata=_whole())  # an accepted backend difference, and why
    notes: list[str] = field(default_factory=list, metadata=_notes())  # e.g. an artifact not built, and why
    # torch-tensorrt converter coverage of the plain program, from the op list kept as data.
    tensorrt_ops_source: str | None = field(default=None, metadata=_whole())  # e.g. "torch-tensorrt 2.14.0"
    tensorrt_unconvertible: list[str] = field(default_factory=list, metadata=_whole())  # "node: op (reason)"
    # Set when torch.export could not capture the whole model and it was folded in parts.
    capture_blocker: str | None = field(default=None, metadata=_whole())  # the whole-model capture error's line
    parts: list[Part] = field(default_factory=list, metadata=_whole())  # folded submodules, largest first
    kept_parts: list[KeptPart] = field(default_factory=list, metadata=_whole())  # left as written, and why
    # The cost rule and each contested decision it took (a merge that adds MACs: merged vs kept apart).
    cost_rule: str | None = None  # e.g. "modeled on cpu: <model>, 2 threads, batch 1, float32"
    decisions: list[dict] = field(default_factory=list, metadata=_decisions())  # repfx.passes.cost.Decision dicts
    int8: dict | None = field(default=None, metadata=_whole())  # precision="int8": repfx.int8.deploy's summary
    rule_counts: dict[str, int] = field(default_factory=dict)  # rule -> ops of rewritten regions it gave a form

    def absorb(self, part: str, report: Report) -> None:
        """Merge the report of the part named ``part`` into this one, field by field (``PARTS`` policies)."""
        for spec in fields(self):
            value = getattr(report, spec.name)
            policy = spec.metadata.get(PARTS)
            if policy is not None:
                policy(self, report, spec.name, part)
            elif isinstance(getattr(self, spec.name), list):
                getattr(self, spec.name).extend(value)
            elif isinstance(getattr(self, spec.name), dict):
                mine = getattr(self, spec.name)
                mine.update({key: mine.get(key, 0) + count for key, count in value.items()})
            elif isinstance(getattr(self, spec.name), (int, float)) and not isinstance(value, bool):
                setattr(self, spec.name, getattr(self, spec.name) + value)
            elif getattr(self, spec.name) is None:
                setattr(self, spec.name, value)

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        lines = [f"repfx report: {self.model}", ""]
        lines += _table(["executed ops", "before", "after"],
                        [[name, str(self.ops_before.get(name, "-")), str(self.ops_after.get(name, "-"))]
                         for name in ("convolution", "batch_norm", "add", "total")])
        lines.append(f"parameters: {self.parameters_before:,} -> {self.parameters_after:,}")
        if self.max_abs_error is None:
            lines.append("verification: skipped")
        else:
            # The tolerance applied is atol + rtol * max(1, max|y|) of the output judged; a difference beyond it
            # that rounding through discontinuous ops explains was accepted, and the headline says so.
            verdict = ("beyond tolerance, accepted (see the note; strict=True refuses)" if self.verification_note
                       else "within tolerance")
            lines.append(f"verification: max |error| {_sci(self.max_abs_error)}, relative {_sci(self.max_rel_error)}, "
                         f"{verdict} (tolerance applied {_sci(self.tolerance)} = atol + rtol * max(1, max|y|))")
            if self.local_proofs is not None:
                proofs = self.local_proofs
                lines.append(f"local proofs: {proofs.regions_proven} region(s) matched in float64 on "
                             f"{proofs.input_sets} input set(s) (worst {_sci(proofs.worst_relative_error, 1)} relative)"
                             + (f", {proofs.regions_failed} failed and were left as written"
                                if proofs.regions_failed else ""))
            if self.verification_note:
                lines.append(f"  note: {self.verification_note}")
        if self.mode_changes:
            lines.append(f"train-mode modules captured in eval mode ({len(self.mode_changes)}):")
            lines += [f"  {group}" for group in grouped_mode_changes(self.mode_changes)]
        if self.buffers_written:
            lines.append(f"buffers the forward writes (the plain graph keeps writing them): "
                         f"{', '.join(self.buffers_written)}")
        if self.backend is not None:
            checked = ("judged on held-out data, see int8 below" if self.int8 else
                       "not verified" if self.backend_max_abs_error is None else
                       f"max |error| vs plain fp32 graph {_sci(self.backend_max_abs_error)} "
                       f"(tolerance applied {_sci(self.backend_tolerance)}"
                       + ("; beyond it, accepted: see the note)" if self.backend_note else ")"))
            lines.append(f"backend: {self.backend} {self.precision}, {checked}")
            if self.backend_note:
                lines.append(f"  note: {self.backend_note}")
        if self.tensorrt_ops_source is not None:
            lines.append(f"TensorRT conversion ({self.tensorrt_ops_source} converter list): " + (
                f"{len(self.tensorrt_unconvertible)} op(s) would fall back to PyTorch" if self.tensorrt_unconvertible
                else "every op has a converter (no PyTorch fallback expected)"))
            lines += [f"  {entry}" for entry in self.tensorrt_unconvertible]
        lines += _int8_lines(self.int8) if self.int8 else []
        lines += [f"note: {note}" for note in self.notes]
        lines += _parts_lines(self) if self.capture_blocker is not None else []
        lines.append(f"passes ran {self.iterations} time(s); "
                     + ", ".join(f"{phase} {secs:.2f}s" for phase, secs in self.seconds.items()))
        lines += ["", f"merged ({len(self.rewrites)}):"]
        lines += _table(["rewrite", "ops", "count"], _grouped_rewrites(self.rewrites)) if self.rewrites else ["  none"]
        lines += _growth_lines(self)
        lines += _decision_lines(self)
        lines += ["", f"refused ({len(self.refusals)}):"]
        lines += grouped_refusals(self.refusals) or ["  none"]
        lines += kept_lines(self.kept_ops)
        return "\n".join(lines)


def _sci(value: float, digits: int = 3) -> str:
    """``value`` in scientific notation; an exact zero reads 0.000e+00 whatever its sign (-0.0 + 0.0 is 0.0)."""
    return f"{value + 0.0:.{digits}e}"


def _int8_lines(int8: dict, layers_shown: int = 5) -> list[str]:
    """The INT8 decisions: format and why, data, held-out scores, layers left in float, the most sensitive."""
    verdict = ("meets" if int8["met_target"] else
               "MISSES (accepted below target)" if int8["accepted_below_target"] else "misses")
    final = int8["candidates"][int8["chosen"]]
    lines = [f"int8 ({int8['format']}): {int8['format_reason']}",
             f"  calibration: {int8['calibration']}",
             f"  held out, vs the fp32 plain graph: all layers int8 {final['all_int8']}; deployed {final['final']}; "
             f"{verdict} the target ({int8['target']})",
             f"  equalization: {int8['equalization']}"]
    lines += [f"  in float: {entry['layer']}: {entry['why']}" for entry in int8["float_layers"]]
    ranked = sorted((row for row in int8["layers"] if row["sensitivity_rank"] is not None),
                    key=lambda row: row["sensitivity_rank"])[:layers_shown]
    if ranked:
        lines.append("  most sensitive layers (max/std after folding <- before; int8 weight SQNR; alone in int8):")
        lines += [f"    {row['module'] or row['layer']}: {row['max_over_std']['largest']:.1f} <- "
                  f"{'?' if row['before'] is None else format(row['before']['largest'], '.1f')}; "
                  f"{row['sqnr_db']:.1f} dB; {row['alone_in_int8']}" for row in ranked]
    return lines


def _growth_lines(report: Report) -> list[str]:
    """Each merge that more than doubled its parameters, with what it bought: model size is a cost too."""
    grown = [rewrite for rewrite in report.rewrites if rewrite.growth_note]
    if not grown:
        return []
    return ["", f"merges that more than double their parameters ({len(grown)}):"] + [
        f"  {rewrite.module or rewrite.nodes[0]}: {rewrite.growth_note}" for rewrite in grown]


def _decision_lines(report: Report) -> list[str]:
    """Contested decisions grouped by the forms compared (a repeated block decides alike), with their costs."""
    if report.cost_rule is None:
        return []
    lines = ["", f"cost rule: {report.cost_rule}; contested decisions ({len(report.decisions)}):"]
    groups: dict[tuple, list[dict]] = {}
    for decision in report.decisions:
        groups.setdefault((decision["merged"], decision["apart"], decision["merged_won"]), []).append(decision)
    for (merged, apart, won), decisions in groups.items():
        first = decisions[0]
        where = ", ".join(d["where"] for d in decisions[:3]) + (f" and {len(decisions) - 3} more"
                                                               if len(decisions) > 3 else "")
        lines.append(f"  {len(decisions)}x {'merged' if won else 'kept apart'}: [{merged}] "
                     f"{amount_text(first['merged_cost'], first['unit'])} vs [{apart}] "
                     f"{amount_text(first['apart_cost'], first['unit'])} ({first['how']})  [{where}]")
    return lines if report.decisions else lines + ["  none"]



def _parts_lines(report: Report) -> list[str]:
    """The parts a model that could not be captured whole was folded in, and those left as written."""
    lines = [f"folded in parts: {report.capture_blocker}"]
    for part in report.parts:
        ops = ", ".join(f"{name} {part.ops_before.get(name, 0)}->{part.ops_after.get(name, 0)}"
                        for name in ("convolution", "batch_norm", "total"))
        lines.append(f"  folded {part.name} ({part.module}, {part.calls} call(s), {part.signatures} signature(s)): "
                     f"{part.rewrites} rewrite(s), executed {ops}")
    lines += [f"  kept   {kept.name}: {kept.reason}" for kept in report.kept_parts]
    return lines


def _grouped_rewrites(rewrites: list[Rewrite]) -> list[list[str]]:
    """One row per distinct rewrite kind: a 22-block net prints a few rows, not 22."""
    rows: dict[str, list] = {}
    for rewrite in rewrites:
        row = rows.setdefault(rewrite.kind, [rewrite.kind, f"{rewrite.ops_before}->{rewrite.ops_after}", 0])
        row[2] += 1
    return [[kind, ops, str(count)] for kind, ops, count in rows.values()]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    fmt = "  " + "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*row) for row in rows]
