"""The report's long lists as a few lines: one line per reason, with a count and a few module paths.

A real model refuses the same thing many times and keeps many ops for one reason (every
residual add reads two tensors; every LayerNorm written out keeps its scale); a line per
entry would hide the one worth reading. The full lists stay in ``Report.to_dict()``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from repfx.passes.refusals import CODES, LEFT_AS_WRITTEN

if TYPE_CHECKING:
    from repfx.report import KeptOp, Refusal


def grouped_refusals(refusals: list[Refusal], names_shown: int = 3) -> list[str]:
    """One line per refusal code, most frequent first, with a few of its modules (node names where torch
    recorded no module).

    A group says what its code means (``repfx.passes.refusals.CODES``), not one member's
    sentence with that member's names; a code met once shows its sentence.
    """
    lines = []
    for code, members in _groups(refusals, lambda refusal: refusal.code or refusal.reason):
        if len(members) == 1:
            lines.append(f"  {where(members[0])}: {members[0].reason}")
            continue
        meaning = f"{CODES[code]} ({code})" if code in CODES else members[0].reason
        lines.append(f"  {len(members)}x {meaning}  {_places(members, names_shown)}")
    return lines


def kept_lines(kept: list[KeptOp], names_shown: int = 3) -> list[str]:
    """The BatchNorm, affine, pad, pool and parameter-only ops still executed: those left as written, one line
    per reason (``LEFT_AS_WRITTEN``), apart from those a refused merge keeps, one line per refusal code."""
    if not kept:
        return []
    left = [op for op in kept if op.code not in CODES]
    refused = [op for op in kept if op.code in CODES]
    lines = ["", f"left as written ({len(left)} of the {len(kept)} BatchNorm/affine/pad/pool/parameter ops "
             "still executed):"]
    lines += _kept_groups(left, LEFT_AS_WRITTEN, names_shown) or ["  none"]
    if refused:
        lines += [f"kept by refused merges ({len(refused)}):"] + _kept_groups(refused, CODES, names_shown)
    return lines


def _kept_groups(kept: list[KeptOp], meanings: dict[str, str], names_shown: int) -> list[str]:
    lines = []
    for code, members in _groups(kept, lambda op: op.code):
        if len(members) == 1:
            lines.append(f"  {where(members[0])}: {members[0].reason} ({code})")
            continue
        kinds = ", ".join(f"{count} {kind}" for kind, count in Counter(op.kind for op in members).items())
        lines.append(f"  {kinds}: {meanings.get(code, code)} ({code})  {_places(members, names_shown)}")
    return lines


def _groups(entries: list[Any], key: Callable[[Any], str]) -> list[tuple[str, list[Any]]]:
    """Entries grouped by ``key``, the largest group first."""
    groups: dict[str, list[Any]] = {}
    for entry in entries:
        groups.setdefault(key(entry), []).append(entry)
    return sorted(groups.items(), key=lambda item: len(item[1]), reverse=True)


def _places(entries: list[Any], names_shown: int) -> str:
    """``[a, b, c and 4 more]``: where the entries are, each place once (a module may hold several)."""
    places = list(dict.fromkeys(where(entry) for entry in entries))
    more = f" and {len(places) - names_shown} more" if len(places) > names_shown else ""
    return f"[{', '.join(places[:names_shown])}{more}]"


def where(entry: Refusal | KeptOp) -> str:
    """Where a person finds the entry: its module path, else its node's name (torch recorded no module)."""
    return entry.module or entry.node
