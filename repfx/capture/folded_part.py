"""The module that stands in for a folded submodule: its plain graphs, one per call signature seen.

The parent's forward keeps calling ``self.<name>(...)`` as it did; the stand-in picks the
graph captured for that call's signature (``repfx.capture.calls``) and returns what the
submodule returned (the graph rebuilds tuples, lists and dicts itself). A call of a
signature never seen (another image size, say) runs the original submodule, which is
kept for that and for attribute reads (``model.backbone.out_channels``): slower, never
different. The first such call warns.

A plain graph from capture takes the positional arguments it was captured with, so a
submodule called with keyword arguments is captured through ``keyword_call``: an adapter
taking ``(args, kwargs)`` as two positional arguments, which the stand-in passes on.
"""

from __future__ import annotations

from typing import Any

from torch import fx, nn

from repfx.errors import warn_user
from repfx.capture.calls import Signature, Unsupported, describe, signature


class KeywordCall(nn.Module):
    """``forward(args, kwargs) -> module(*args, **kwargs)``: what export can capture a keyword call through."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, args: tuple, kwargs: dict) -> Any:
        return self.module(*args, **kwargs)


def keyword_call(module: nn.Module) -> KeywordCall:
    """The adapter, as a class named after ``module``'s, so capture errors and reports name the user's class."""
    named = type(type(module).__name__, (KeywordCall,), {"__module__": KeywordCall.__module__})
    adapter = named(module)
    adapter.training = module.training  # a new module trains by default: it must not look like a train-mode one
    return adapter


def takes_keywords(key: Signature) -> bool:
    """Whether calls of this signature pass keyword arguments (then the graph is a ``KeywordCall``'s)."""
    spec, _ = key
    return spec.child(1).num_children > 0


class FoldedPart(nn.Module):
    """A submodule replaced by its plain graphs; ``unfolded`` (the submodule) runs calls of signatures not seen."""

    def __init__(self, name: str, original: nn.Module, graphs: dict[Signature, fx.GraphModule]) -> None:
        super().__init__()
        self.part_name = name
        self.unfolded = original
        self.plain_graphs = nn.ModuleList(graphs.values())
        self.call_signatures = {key: index for index, key in enumerate(graphs)}
        self.warned_unseen = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        try:
            key = signature(args, kwargs)
        except Unsupported:
            key = None
        index = self.call_signatures.get(key)
        if index is None:
            self._warn_unseen(key)
            return self.unfolded(*args, **kwargs)
        graph = self.plain_graphs[index]
        return graph(args, kwargs) if takes_keywords(key) else graph(*args)

    def _warn_unseen(self, key: Signature | None) -> None:
        if self.warned_unseen:
            return
        self.warned_unseen = True
        seen = "; ".join(describe(known) for known in self.call_signatures)
        warn_user(f"repfx: {self.part_name} was folded for calls with inputs {seen}; this call "
                      f"({'unsupported arguments' if key is None else describe(key)}) was not seen, so calls like it "
                      "run the submodule as written (unfolded, same results)")

    def __getattr__(self, name: str) -> Any:
        """Attributes the stand-in lacks are the original submodule's (the parent may read them)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            unfolded = self.__dict__.get("_modules", {}).get("unfolded")
            if unfolded is None or name == "unfolded":
                raise
            return getattr(unfolded, name)

    def extra_repr(self) -> str:
        return f"{self.part_name}: folded, {len(self.plain_graphs)} call signature(s)"
