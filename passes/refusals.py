"""Refusals: why a merge was not done, as a stable code (for grouping and tests) and a sentence (for people).

Every refusal the passes report carries one of ``CODES``; the sentence (``reason``) says
the details of this node. Reports group by the code, never by parsing the sentence, so
a sentence can be reworded without moving a refusal to another group.
"""

from __future__ import annotations

from dataclasses import dataclass

CODES: dict[str, str] = {
    # -- exactness: no single form computes the region ---------------------------------------
    "different-inputs": "branches read different tensors, so their kernels cannot add",
    "stride": "branches have different strides (different output grids)",
    "alignment": "branch centres are misaligned (2*padding - (k-1)*dilation differs)",
    "channels": "channel counts do not line up between the forms",
    "rank": "branches have different spatial rank",
    "border": "zero padding would see a shift (or real pixels) where the original sees zeros",
    "padding": "asymmetric, negative or non-spatial padding has no convolution form",
    "padding-mode": "a padding mode other than zeros",
    "border-fill": "writes into a padded border that are not one per-channel constant on exactly the border",
    "pool-window": "pooling windows that are partial or not divided by their size",
    "whole-map-pool": "a pool whose window spans the whole feature map: as a kernel it holds at one resolution only",
    "transposed": "a transposed convolution merges only with a per-channel op or an unpadded 1x1 of its own",
    "permute": "an op between a permutation and its inverse reads neighbouring pixels",
    "reduction": "a reduction over more than the stacked dim is no sum of branches",
    "broadcast": "a sum that broadcasts its branches",
    "dtype": "the dtype changes inside the region (type promotion)",
    "another-tensor": "a cast or layout copy is another tensor than its source",
    "not-constant": "a weight is computed from graph inputs",
    "parameter-subgraph": "a value of parameters alone that must still run on every call (random, written, returned)",
    "symbolic-shape": "a symbolic channel count or an unknown size",
    "shared-output": "an op's output is also read outside the region",
    "shared-weight": "merging a use of a shared weight would only copy it",
    "not-homogeneous": "the op between two layers is not positively homogeneous, so their channels cannot be rescaled",
    "layer-pair": "the two layers' channels do not correspond (a transposed convolution, a conv feeding a linear)",
    "rows": "an op on partitions (rows of a reshaped map) that is not one matrix on each partition's values",
    "rule-error": "a rule raised an unexpected error on an op variant it did not foresee",
    # -- price and proof: exact, but not done --------------------------------------------------
    "cost": "the cost rule found the merge slower (or more work) than the ops it replaces",
    "param-growth": ("the merge (or a stored parameter-only value) would hold more parameters than "
                     "max_param_growth times what it replaces"),
    "chain-partition": "how a chain of linear ops was cut (a note, not a failure)",
    "weight-copied": "a use of a shared weight was folded into new weights; the model holds both (a note)",
    "local-proof": "the float64 proof of the rewritten region failed; the region stays as written",
}

# Why an op stays as written where no merge was refused (``kept_ops``): the report groups these under
# "left as written", apart from the refused merges. ``unexplained`` is a gap in that accounting.
LEFT_AS_WRITTEN: dict[str, str] = {
    "nothing-to-fold": "no conv or linear on either side to fold into (it reads and feeds ops outside the algebra)",
    "reads-input": "reads a model input directly, and nothing it feeds can absorb it",
    "normalization": "part of a normalization by the input's own statistics (LayerNorm/GroupNorm internals), "
                     "which is not linear",
    "batch-statistics": "a BatchNorm normalizing with the batch's own statistics (training mode, no running stats)",
    "not-per-channel": "its constant varies along more than the channel dim: no per-channel form",
    "no-channel-dim": "a tensor without a channel dim (fewer than 2 dims) for a convolution to act on",
    "max-pool": "max pooling is not linear",
    "adaptive-pool": "an adaptive pool: its windows follow the input size, so no fixed kernel computes it",
    "layout": "a reshape inside a channel-last region: no single linear emits it in its layout",
    "unexplained": "no known reason: a gap in repfx's accounting of what stays (please report it)",
}


class NotExact(Exception):
    """A combination of forms would not compute the same function (or not cheaper); ``str`` says why."""

    def __init__(self, code: str, reason: str) -> None:
        if code not in CODES:
            raise ValueError(f"unknown refusal code {code!r}: add it to repfx.passes.refusals.CODES")
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class Refused:
    """One refusal as the passes report it: the node (by name), its code (``CODES``) and the sentence users read."""

    node: str
    code: str
    reason: str

    @classmethod
    def of(cls, node: str, refusal: NotExact) -> Refused:
        return cls(node, refusal.code, refusal.reason)
