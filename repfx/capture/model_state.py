"""What the model as given does that its captured eval graph will not: modes and written state.

repfx captures a model with eval semantics (BatchNorm with running statistics,
dropout off), because that is the function a deploy runtime computes. A model handed
over in eval mode can still hold submodules in train mode on purpose (test-time BN
adaptation, MC dropout, a ``DropPath`` left training): the plain graph then computes
something else than the model as given, which must be said, per module, not found
out in production. Likewise a forward that writes buffers (a step counter) keeps
doing so in the plain graph; the report names them.
"""

from __future__ import annotations

import functools
import inspect
import re
from dataclasses import dataclass

from torch import nn

_READS_TRAINING = re.compile(r"\.training\b")


@dataclass(frozen=True)
class ModeChange:
    """One submodule whose behaviour changes when it is switched to eval for capture."""

    module: str  # qualified name; "" is the model itself
    kind: str  # its class name
    effect: str  # what train mode did that eval mode does not

    def __str__(self) -> str:
        return f"{self.module or '(the model)'} ({self.kind}): {self.effect}"


def train_mode_changes(model: nn.Module) -> list[ModeChange]:
    """Every module in train mode whose forward depends on it, with what changes in eval."""
    changes = []
    for name, module in model.named_modules():
        if not module.training:
            continue
        effect = _train_mode_effect(module)
        if effect is not None:
            changes.append(ModeChange(name, type(module).__name__, effect))
    return changes


def grouped_mode_changes(changes: list[ModeChange], names_shown: int = 3) -> list[str]:
    """One line per kind of module and effect, with a few of its names: a timm model in train mode has dozens of
    BatchNorms that all change the same way, and one line per module buries the one that matters."""
    groups: dict[tuple[str, str], list[ModeChange]] = {}
    for change in changes:
        groups.setdefault((change.kind, change.effect), []).append(change)
    lines = []
    for (kind, effect), members in groups.items():
        if len(members) == 1:
            lines.append(str(members[0]))
            continue
        names = ", ".join(change.module or "(the model)" for change in members[:names_shown])
        more = f" and {len(members) - names_shown} more" if len(members) > names_shown else ""
        lines.append(f"{len(members)}x {kind} ({names}{more}): {effect}")
    return lines


def describe_mode_changes(changes: list[ModeChange]) -> str:
    """The grouped changes on one line, for a warning."""
    return "; ".join(grouped_mode_changes(changes))


def _train_mode_effect(module: nn.Module) -> str | None:
    if isinstance(module, nn.modules.batchnorm._NormBase):
        if not module.track_running_stats:
            return None  # normalizes with batch statistics in eval too: nothing changes
        return "in train mode it normalizes with batch statistics (and updates running statistics); " \
               "captured with its running statistics"
    if isinstance(module, nn.modules.dropout._DropoutNd):
        if module.p == 0:
            return None
        return f"in train mode it zeroes activations at random (p={module.p}); captured as identity"
    if _forward_reads_training(type(module)):
        return "its forward branches on self.training; captured with training=False"
    return None


@functools.cache
def _forward_reads_training(cls: type) -> bool:
    """Whether the class's own forward source mentions ``.training`` (DropPath, custom blocks).

    Containers and plain layers do not, so they are not reported; a forward whose
    source cannot be read (C extensions, lambdas) is not assumed to branch.
    """
    forward = getattr(cls, "forward", None)
    if forward is None:
        return False
    try:
        source = inspect.getsource(forward)
    except (OSError, TypeError):
        return False
    return bool(_READS_TRAINING.search(source))
