"""Count the aten ops a module actually executes (what a deploy runtime would run)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Summary buckets shown in reports; matching on the op's base name keeps every
# overload and variant (cudnn, mkldnn, legit_no_training...) in its bucket.
_BUCKETS = {
    "convolution": lambda name: "conv" in name,
    "batch_norm": lambda name: "batch_norm" in name,
    "add": lambda name: name in ("add", "add_"),
}


class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched while active, by overload packet name.

    Control flow (``torch.cond``, ``while_loop``: higher-order operators, e.g. from a
    converted TorchScript ``if``) is counted as one op under its own name and run
    with the counter popped, so the ops inside its branches are not counted.
    """

    supports_higher_order_operators = True

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if isinstance(func, torch._ops.HigherOrderOperator):
            self.counts[func.name()] += 1
            return func(*args, **(kwargs or {}))
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count_ops(module: Callable, inputs: Sequence) -> Counter[str]:
    """Run ``module(*inputs)`` once without grad and return the executed op counts."""
    with torch.no_grad(), OpCounter() as counter:
        module(*inputs)
    return counter.counts


def summarize(counts: Counter[str]) -> dict[str, int]:
    """Counts of convolution, batch_norm and add, plus the total of all ops executed."""
    summary = {bucket: sum(n for name, n in counts.items() if match(name)) for bucket, match in _BUCKETS.items()}
    summary["total"] = sum(counts.values())
    return summary
