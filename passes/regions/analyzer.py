"""Find linear regions: the engine that gives every node the affine expression it computes.

Walking the graph once in topological order, each op that has a *rule* gets an
``Expr``: a sum of ``Term``s, each a ``ConvForm`` applied to a *source* node (a
tensor produced outside any linear region: an input, a ReLU, a node with several
consumers...). An op absorbs an operand's expression only when that operand has no
other consumer; otherwise the operand is a boundary and enters as an identity term.
Terms reading the same source are merged when exact and not more expensive
(``forms`` decides exactness, the cost rule here decides price). Every refused merge
is recorded with its code and reason. Nothing is rewritten here: ``fold`` emits the result.
Rules are pure: they build expressions with the analyzer's ``Combinators`` (``combine``),
the one place a merge is priced and an op as written costed.

A weight read by several ops (a module called twice) does not stop a use from
folding: the fold builds new weights for that use and never writes the shared one
(``sharing`` says when a use would only copy it). ``reapply`` runs one rule again on
chosen operand expressions: the chain partition (``partition``) prices its segments so.

The rules (what each aten op computes as a ``ConvForm``) live in ``rules/``, one
module per family of ops; each registers itself in ``RULES`` with ``@rule(...)``.
This module never names a rule: ``registered_rules()`` imports the ``rules`` package,
which imports every module in it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, fx

from repfx.passes.constants import ConstantFolder
from repfx.passes import cost as cost_rule
from repfx.passes.cost import NOTHING, CostRule
from repfx.passes.shapes import size_hint
from repfx.passes.algebra.forms import ConvForm, NotExact
from repfx.passes.regions import sharing
from repfx.passes.regions.combine import Combinators
from repfx.passes.regions.expr import Analysis, CostPolicy, Expr, NotLinear, Term
from repfx.passes.regions.values import as_ints, per_channel

__all__ = ["RULES", "Analysis", "Analyzer", "CostPolicy", "Expr", "NotLinear", "Operand", "Rule", "Term", "analyze",
           "as_ints", "per_channel", "registered_rules", "rule"]  # rules and passes import these from here

Operand = Callable[..., Expr]  # (arg, channel_last=False) -> Expr
Rule = Callable[["Analyzer", fx.Node, Operand], Expr]  # raises NotExact(code, reason) (reported) or NotLinear
RULES: dict[Any, Rule] = {}  # aten target -> the rule that analyzes it


def rule(*targets: Any) -> Callable[[Rule], Rule]:
    """Register the decorated function as the rule of each aten ``target``.

    A target has one rule: a second rule for it would silently replace the first
    one, depending on import order, so it is an error.
    """
    def register(fn: Rule) -> Rule:
        for target in targets:
            known = RULES.get(target)
            if known is not None and _qualified_name(known) != _qualified_name(fn):  # the same rule reloaded is fine
                raise ValueError(f"{target} already has the rule {_qualified_name(known)}; "
                                 f"{_qualified_name(fn)} cannot register it again")
            RULES[target] = fn
        return fn
    return register


def _qualified_name(fn: Callable) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


def registered_rules() -> dict[Any, Rule]:
    """``RULES``, filled: importing the rules package imports (and so registers) every module in it."""
    importlib.import_module(f"{__package__}.rules")
    return RULES


def analyze(gm: fx.GraphModule, cost: CostPolicy = "macs", boundaries: frozenset[fx.Node] = frozenset(),
            constants: ConstantFolder | None = None) -> Analysis:
    """Expression of every node that belongs to a linear region of ``gm``; ``boundaries`` are never absorbed.

    ``constants``: a folder already filled for this graph, as it stands (another analysis of it).
    """
    return Analyzer(gm, cost, boundaries, constants).run()


class Analyzer(Combinators):
    """One walk over a graph; rules call back into it to read operands, compose forms and refuse."""

    def __init__(self, gm: fx.GraphModule, cost: CostPolicy | CostRule,
                 boundaries: frozenset[fx.Node] = frozenset(), constants: ConstantFolder | None = None) -> None:
        self.gm = gm
        self.cost = cost_rule.resolve(cost)
        self.boundaries = boundaries  # ops whose use would only copy a shared weight (``sharing``)
        # Constant values depend on the graph alone, not on the rule: the analyses of one unchanged
        # graph (eager, careful, each boundary retry) share one folder and fold each constant once.
        self.constants = constants if constants is not None else ConstantFolder(gm)
        self.result = Analysis()
        self.rules = registered_rules()
        self._shapes: dict[tuple[fx.Node, bool], tuple[int, ...]] = {}  # ``sample_shape`` of nodes read so far
        self._arguments: dict[fx.Node, dict[str, Any]] = {}  # ``arguments`` of nodes read so far

    def run(self) -> Analysis:
        for node in self.gm.graph.nodes:
            node_rule = self.rules.get(node.target) if node.op == "call_function" else None
            if node_rule is None or self.constants.is_constant(node):
                continue  # no rule: a boundary of any region; a constant: folded where it is read
            expr = self._build(node_rule, node)
            if expr is not None:
                self.result.exprs[node] = expr
        return self.result

    def _build(self, node_rule: Rule, node: fx.Node) -> Expr | None:
        """Try with operands' expressions absorbed; on refusal, with operands as boundaries.

        Any other error (an op variant a rule did not foresee) leaves the node
        alone with the error as its refusal: a graph is never half-understood.
        """
        for attempt, operand in enumerate((self._absorbing(node), self._boundary)):
            read: list[fx.Node] = []
            try:
                expr = self._same_dtype(node, node_rule(self, node, _recording(operand, read)))
                self.result.operands[node] = tuple(dict.fromkeys(read))
                self.result.rules[node] = node_rule.__name__
                return expr
            except NotLinear:
                return None
            except NotExact as refusal:
                if attempt == 0:  # the first refusal explains the node; the retry's is not reported
                    self.result.refuse(node, refusal.code, refusal.reason)
            except Exception as error:
                self.result.refuse(node, "rule-error", f"not analyzed: {type(error).__name__}: {error}")
                return None
        return None

    @staticmethod
    def _same_dtype(node: fx.Node, expr: Expr) -> Expr:
        """Type promotion (an fp32 conv times an fp64 buffer) changes the dtype inside a
        region; one emitted conv has one dtype, so such regions are not formed."""
        dtype = node.meta["val"].dtype
        for term in expr.terms:
            if term.source.meta["val"].dtype != dtype:
                raise NotExact("dtype", f"{node.name}: dtype changes from {term.source.meta['val'].dtype} to {dtype} "
                               "inside the region (type promotion)")
        return expr

    # -- operands --------------------------------------------------------------------
    def _absorbing(self, consumer: fx.Node) -> Operand:
        def operand(arg: Any, channel_last: bool = False) -> Expr:
            if not isinstance(arg, fx.Node):
                raise NotLinear
            expr = self.result.exprs.get(arg)
            if expr is None or (expr.grid is None and expr.channel_last != self._rank0(arg, channel_last)):
                return self._boundary(arg, channel_last)  # (partitions are read in their own layout, ``rows``)
            if arg in self.boundaries:
                self.result.refuse(arg, "shared-weight",
                                   sharing.only_copies(arg, consumer, self.result.shared.get(arg, [])))
                return self._boundary(arg, channel_last)
            if len(arg.users) > 1:
                others = ", ".join(user.name for user in arg.users if user is not consumer)
                self.result.refuse(arg, "shared-output", f"output also used by {others}; not merged into {consumer.name}")
                return self._boundary(arg, channel_last)
            return expr
        return operand

    def reapply(self, node: fx.Node, operand_expr: Callable[[fx.Node], Expr | None]) -> Expr:
        """``node``'s rule again, reading ``operand_expr(arg)`` for each operand (a boundary where None).

        Raises what the rule raises. Nothing is recorded: the expressions the walk
        found stay as they are, and a refusal here is the caller's to explain.
        """
        def operand(arg: Any, channel_last: bool = False) -> Expr:
            expr = operand_expr(arg) if isinstance(arg, fx.Node) else None
            if expr is None or expr.channel_last != self._rank0(arg, channel_last):
                return self._boundary(arg, channel_last)
            return expr
        recorded, self.result.refusals = self.result.refusals, {}
        try:
            return self._same_dtype(node, self.rules[node.target](self, node, operand))
        finally:
            self.result.refusals = recorded

    def _boundary(self, arg: Any, channel_last: bool = False) -> Expr:
        if not isinstance(arg, fx.Node):
            raise NotLinear
        shape = self.sample_shape(arg, channel_last)
        form = ConvForm.identity(shape[0], len(shape) - 1)
        return Expr((Term(arg, form, NOTHING),), frozenset(), shape, self.priced_shape(arg, channel_last))

    def _rank0(self, node: fx.Node, channel_last: bool) -> bool:
        """Whether ``node`` is read with rank-0 forms: channel-last reads, and every [N, C] tensor."""
        value = node.meta.get("val")
        return channel_last or (isinstance(value, torch.Tensor) and value.dim() == 2)

    def channel_last_operands(self, node: fx.Node) -> bool:
        """An elementwise op on an N-D tensor continues a channel-last (linear) region
        when one of its operands already is one."""
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor) or value.dim() <= 2:
            return False
        exprs = (self.result.exprs.get(arg) for arg in node.args if isinstance(arg, fx.Node))
        return any(expr is not None and expr.channel_last for expr in exprs)

    def channel_last_broadcast(self, node: fx.Node) -> bool:
        """A broadcasting op (``x + c``, ``c * x``) reads channels last when it continues a channel-last
        region, or when its constant varies along the last dim alone (GRN's ``[1, 1, 1, C]`` gamma and
        beta on ``[N, H, W, C]``): broadcast so, it is a per-channel op of the last dim, which no form
        with dim 1 as the channel holds."""
        if self.channel_last_operands(node):
            return True
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor) or value.dim() <= 2:
            return False
        shape = self.sample_shape(node)
        constants = (self.constants.value(arg) for arg in node.args[:2])
        return any(isinstance(c, Tensor) and c.dim() > 0 and c.shape[-1] == shape[-1] > 1
                   and per_channel(c, shape) is None and per_channel(c, shape[-1:]) is not None for c in constants)

    def sample_shape(self, node: fx.Node, channel_last: bool = False) -> tuple[int, ...]:
        """Shape without the batch dim (the tensor must be float and at least [N, C]).

        Channel-last reads (a linear on [..., C]) see ``(C,)``: the leading dims
        act as batch. Symbolic sizes (dynamic spatial dims, as TorchScript
        conversion produces) enter only the cost rule, which uses their example
        value: exactness never depends on spatial size because merged forms share
        stride and alignment.
        """
        known = self._shapes.get((node, channel_last))
        if known is not None:
            return known  # rules, operands and the cost of each merge all ask for the same few shapes
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dim() < 2:
            raise NotLinear
        sizes = value.shape[-1:] if channel_last else value.shape[1:]
        shape = tuple(size_hint(size) for size in sizes)
        if shape[0] is None or not all(isinstance(size, int) for size in shape):
            raise NotExact("symbolic-shape",
                           f"{node.name} has a symbolic channel count or an unknown size {tuple(value.shape[1:])}")
        self._shapes[node, channel_last] = shape
        return shape

    def priced_shape(self, node: fx.Node, channel_last: bool = False) -> tuple[int, ...]:
        """The per-sample shape an op on ``node`` is priced on (``Expr.cost_shape``): ``sample_shape``, with a
        channel-last read's leading dims after the channel (their example sizes, when symbolic)."""
        shape = self.sample_shape(node, channel_last)
        if not channel_last:
            return shape
        rows = tuple(size_hint(size) for size in node.meta["val"].shape[1:-1])
        return shape + rows if all(isinstance(size, int) for size in rows) else shape

    # -- helpers for rules -------------------------------------------------------------
    def arguments(self, node: fx.Node) -> dict[str, Any]:
        """``node``'s arguments by their schema names, with the defaults export leaves out filled in."""
        known = self._arguments.get(node)
        if known is None:
            normalized = node.normalized_arguments(self.gm, normalize_to_only_use_kwargs=True)
            if normalized is None:
                raise NotLinear  # not a call torch.fx can match to the op's schema
            known = self._arguments[node] = normalized.kwargs
        return known

    def weight(self, node: fx.Node, arg: Any, what: str = "weight") -> Tensor:
        """A constant ``node`` reads. A constant other ops read too is noted (``sharing``): folding
        never writes it but builds new weights for this use, so sharing only matters to the cost."""
        value = self.constants.tensor(arg)
        if value is None:
            raise NotExact("not-constant", f"{node.name}: {what} is computed from graph inputs, not a constant")
        shared = sharing.shared_with(node, arg, what, self.constants)
        if shared and shared not in self.result.shared.get(node, []):  # ``reapply`` reads weights again
            self.result.shared.setdefault(node, []).append(shared)
        return value


def _recording(operand: Operand, read: list[fx.Node]) -> Operand:
    """``operand``, noting each tensor the rule reads through it (the chain partition follows them)."""
    def recorded(arg: Any, channel_last: bool = False) -> Expr:
        if isinstance(arg, fx.Node):
            read.append(arg)
        return operand(arg, channel_last)
    return recorded
