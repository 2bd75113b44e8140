"""Graph surgery: write an ``Expr`` back into the graph as convolutions, scales and adds.

The ``Plan`` (which ops an expression becomes) is computed before any edit so the
pass can first ask whether the rewrite executes fewer ops than it replaces; the
``Emission`` is the nodes then inserted for it, not yet wired in.
Weights are cast back to the model's dtype here, once.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, fx, nn

from repfx.passes.algebra.forms import ConvForm, pointwise_at_rank
from repfx.passes.algebra.kernels import float64, regroup
from repfx.passes.algebra.transposed import TransposedConvForm
from repfx.passes.regions.analyzer import Expr, Term

aten = torch.ops.aten
REWRITE_META = "repfx_rewrite"  # on every emitted node: the name of the region root it replaced
_CONV = {1: aten.conv1d.default, 2: aten.conv2d.default, 3: aten.conv3d.default}
_CONV_TRANSPOSE = {1: aten.conv_transpose1d.default, 2: aten.conv_transpose2d.input, 3: aten.conv_transpose3d.input}


@dataclass(frozen=True)
class Plan:
    """Which ops an expression becomes, before any node is written."""

    convs: tuple[Term, ...]  # terms emitted as a convolution / linear
    scales: tuple[Term, ...]  # per-channel scale (one mul)
    identities: tuple[Term, ...]  # the source itself
    bias: Tensor  # total shift of the expression, placed once
    rank: int  # spatial rank of the forms (0: linear, channel is the last dim)
    rows: tuple[int, ...] | None = None  # the forms compute partitions laid out so; the root otherwise: a reshape after
    linear: bool = False  # the region holds a linear as written: a pointwise op moved across a permute stays one

    @property
    def reshape(self) -> bool:
        return self.rows is not None

    @property
    def bias_needs_add(self) -> bool:
        """A shift no op of the plan adds: a convolution's bias takes it, and so does a scale, emitted as one
        ``addcmul(shift, x, scale)`` (priced as one elementwise op, a scale and shift is one op run: a BN
        then a layer scale after a nonlinearity is one op, not a mul and an add, which would save nothing)."""
        return not self.convs and not self.scales and bool(torch.any(self.bias))

    @property
    def is_plain_copy(self) -> bool:
        """The region computes its input exactly (``x*0.5 + x*0.5``): emitted as one copy, never an alias."""
        return not self.convs and not self.scales and len(self.identities) == 1 and not self.bias_needs_add

    @property
    def crops(self) -> int:
        """Slices emitted before convs whose form crops (negative padding: ``torch`` convs pad, never crop)."""
        return sum(p < 0 for term in self.convs for p in term.form.padding)

    def conv_forms(self) -> tuple[ConvForm, ...]:
        """The forms of the convolutions and linears emitted (``placement``)."""
        return tuple(placement(term, self.linear)[0] for term in self.convs)

    def produced(self) -> tuple[str, ...]:
        """What the plan emits, for the report: its convolutions and linears, then the other ops by kind."""
        convs = tuple(form.describe() for form in self.conv_forms())
        if self.is_plain_copy:
            return ("copy",) + ("permute",) * self.reading
        terms = self.convs + self.scales + self.identities
        permutes = sum(term.layout is not None for term in terms)
        adds = self.op_count - len(self.convs) - len(self.scales) - self.reading - int(self.reshape)
        inner = tuple(kind for term in terms if term.inner is not None for kind in plan(term.inner).produced())
        return (convs + inner + ("scale",) * len(self.scales) + ("permute",) * permutes + ("add",) * adds
                + ("reshape",) * int(self.reshape))

    @property
    def reading(self) -> int:
        """Ops emitted for what the terms read: a permute per layout, the sums an inner term reads."""
        terms = self.convs + self.scales + self.identities
        return (sum(term.layout is not None for term in terms)
                + sum(plan(term.inner).op_count for term in terms if term.inner is not None))

    @property
    def op_count(self) -> int:
        if self.is_plain_copy:
            return 1 + self.reading
        parts = len(self.convs) + len(self.scales) + len(self.identities)
        return (len(self.convs) + len(self.scales) + max(parts - 1, 0) + int(self.bias_needs_add) + self.crops
                + self.reading + int(self.reshape))


def placement(term: Term, linear: bool) -> tuple[ConvForm, bool]:
    """The form a conv term is emitted as, and whether its permute (``term.layout``) comes after it.

    A pointwise form read through a layout is the same op before the permute as after it, on the
    dim the permute moves; it is emitted where it is the kind the region was written with (``linear``:
    a linear moved across a channels-last permute stays a linear, a 1x1 conv stays a conv).
    """
    form, layout = term.form, term.layout
    if layout is None or not form.is_pointwise or any(form.padding) or form.transposed:
        return form, False
    last = len(layout) - 1
    there = layout[last if form.rank == 0 else 1]  # the form's channel dim, in the source
    if there not in (1, last) or (there == last) != linear or (form.rank == 0) == linear:
        return form, False
    return pointwise_at_rank(form, 0 if there == last else last - 1), True


def plan(expr: Expr) -> Plan:
    convs, scales, identities = [], [], []
    for term in expr.terms:
        form = term.form
        if form.is_diagonal and not any(form.padding):
            (identities if bool(torch.all(form.weight == 1)) else scales).append(term)
        else:
            convs.append(term)
    bias = torch.stack([term.form.bias for term in expr.terms]).sum(0)
    linear = any(op.target is aten.linear.default for op in expr.ops)
    return Plan(tuple(convs), tuple(scales), tuple(identities), bias, expr.terms[0].form.rank,
                rows=None if expr.grid is None else expr.shape, linear=linear)


@dataclass(eq=False)
class Emission:
    """Nodes emitted for one region, not yet wired in: the region still computes the root.

    ``exact`` holds the float64 value of every constant the nodes read (the stored
    parameters are those values rounded once to the model's dtype), so a proof can
    evaluate the emitted algebra without that rounding.
    """

    root: fx.Node
    result: fx.Node
    nodes: list[fx.Node]  # in graph order
    exact: dict[str, Tensor]  # parameter name -> float64 value


class Emitter:
    """Inserts planned ops before a root node; registers new weights on the GraphModule.

    Emission and commitment are separate steps so a rewrite can be proven before
    the graph depends on it: ``emit`` adds nodes that read the region's sources but
    that nothing reads yet, ``commit`` reroutes the root's users to them and
    ``discard`` erases them again.
    """

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm

    def emit(self, root: fx.Node, planned: Plan) -> Emission:
        out = Emission(root, root, [], {})
        with self.gm.graph.inserting_before(root):
            result = self._sum(out, planned, root.meta["val"])
            if planned.is_plain_copy:
                result = self._call(out, aten.clone.default, result)
            if planned.reshape:
                result = self._rows_into_root(out, planned, result)
        out.result = result
        return out

    def _sum(self, out: Emission, planned: Plan, val: Tensor) -> fx.Node:
        """The planned terms computed and added up, with the plan's shift: a node whose value is like ``val``."""
        dtype = val.dtype
        # Per-channel constants broadcast along the forms' channel axis: dim 1 for
        # convolutions, the last dim for rank-0 (linear) forms on [..., C] tensors.
        rank = planned.rank
        parts: list[fx.Node] = []
        for index, term in enumerate(planned.convs):
            bias = planned.bias if index == 0 else term.form.bias.new_zeros(term.form.out_channels)
            parts.append(self._conv_term(out, term, bias, dtype, val, planned.linear))
        for index, term in enumerate(planned.scales):
            scale = self._constant(out, "scale", term.form.weight.reshape((-1,) + (1,) * rank), dtype)
            if index == 0 and not planned.convs and bool(torch.any(planned.bias)):
                shift = self._constant(out, "shift", planned.bias.reshape((-1,) + (1,) * rank), dtype)
                parts.append(self._call(out, aten.addcmul.default, shift, self._read(out, term), scale, val=val))
            else:
                parts.append(self._call(out, aten.mul.Tensor, self._read(out, term), scale, val=val))
        parts.extend(self._read(out, term) for term in planned.identities)
        result = parts[0]
        for part in parts[1:]:
            result = self._call(out, aten.add.Tensor, result, part, val=val)
        if planned.bias_needs_add:
            shift = planned.bias.reshape((-1,) + (1,) * rank)
            result = self._call(out, aten.add.Tensor, result, self._constant(out, "shift", shift, dtype), val=val)
        return result

    def _read(self, out: Emission, term: Term) -> fx.Node:
        """The tensor ``term``'s form reads: its source (less its moved shift: ``inner`` emitted), permuted."""
        source = term.source
        if term.inner is not None:
            source = self._sum(out, plan(term.inner), term.source.meta["val"])
        if term.layout is None:
            return source
        return self._call(out, aten.permute.default, source, list(term.layout),
                          val=aten.permute.default(term.source.meta["val"], list(term.layout)))

    def _conv_term(self, out: Emission, term: Term, bias: Tensor, dtype: torch.dtype, val: Tensor,
                   linear: bool) -> fx.Node:
        """A term's convolution or linear, before or after its permute (``placement``)."""
        form, permute_after = placement(term, linear)
        if not permute_after:
            return self._conv(out, self._read(out, term), form, bias, dtype, val)
        layout = term.layout
        before = val.permute([layout.index(dim) for dim in range(len(layout))])
        node = self._conv(out, self._read(out, replace(term, layout=None)), form, bias, dtype, before)
        return self._call(out, aten.permute.default, node, list(layout), val=val)

    @staticmethod
    def commit(emission: Emission) -> None:
        """The root's users read the emitted result from now on (later emissions too)."""
        emission.root.replace_all_uses_with(emission.result)

    def discard(self, emission: Emission) -> None:
        """Erase the emitted nodes; their parameters go with ``remove_dead_code``."""
        for node in reversed(emission.nodes):
            self.gm.graph.erase_node(node)

    def _conv(self, out: Emission, source: fx.Node, form: ConvForm | TransposedConvForm, bias: Tensor,
              dtype: torch.dtype, val: Tensor) -> fx.Node:
        bias_node = self._constant(out, "bias", bias, dtype)
        if form.rank == 0:  # a linear layer has no groups
            weight_node = self._constant(out, "weight", regroup(form.weight, form.groups, 1), dtype)
            return self._call(out, aten.linear.default, source, weight_node, bias_node, val=val)
        weight_node = self._constant(out, "weight", form.weight, dtype)
        padding = list(form.padding)
        for dim, crop in enumerate(padding):
            if crop < 0:  # a crop the merge left (a cropped branch alone): slice the source, pad no more
                cropped = self._call(out, aten.slice.Tensor, source, dim + 2, -crop, crop)
                cropped.meta["val"] = aten.slice.Tensor(source.meta["val"], dim + 2, -crop, crop)
                source = cropped
                padding[dim] = 0
        if form.transposed:  # a ``TransposedConvForm``: the op's own argument order (groups before dilation)
            return self._call(out, _CONV_TRANSPOSE[form.rank], source, weight_node, bias_node, list(form.stride),
                              list(form.padding), list(form.output_padding), form.groups, list(form.dilation), val=val)
        return self._call(out, _CONV[form.rank], source, weight_node, bias_node,
                          list(form.stride), padding, list(form.dilation), form.groups, val=val)

    def _rows_into_root(self, out: Emission, planned: Plan, rows: fx.Node) -> fx.Node:
        """The rows computed in the forms' layout, reshaped as the root lays them out (``regions.rows``).

        The nodes before it hold the rows as the forms compute them; their values say so, for the next round.
        """
        value = (planned.convs + planned.scales + planned.identities)[0].source.meta["val"]
        for node in out.nodes:
            if node.op == "call_function" and node.target is not aten.slice.Tensor:
                node.meta["val"] = value.new_empty((value.shape[0], *planned.rows))
        return self._call(out, aten.reshape.default, rows, [-1, *out.root.meta["val"].shape[1:]])

    def _call(self, out: Emission, target, *args, val: Tensor | None = None) -> fx.Node:
        """``target(*args)`` before the root; ``val``: its value's fake tensor (the root's when None)."""
        node = self.gm.graph.call_function(target, tuple(args))
        node.meta.update({k: v for k, v in out.root.meta.items() if k in ("val", "stack_trace", "nn_module_stack")})
        if val is not None:
            node.meta["val"] = val
        node.meta[REWRITE_META] = out.root.name
        out.nodes.append(node)
        return node

    def _constant(self, out: Emission, kind: str, value: Tensor, dtype: torch.dtype) -> fx.Node:
        name = _unique_attr(self.gm, f"repfx_{out.root.name}_{kind}")
        # contiguous_format strides, whatever layout the folding arithmetic left behind.
        stored = value.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)  # one copy, never an alias
        self.gm.register_parameter(name, nn.Parameter(stored, requires_grad=False))
        out.exact[name] = float64(value)  # a stored parameter a form kept as it was (a lone copy) is upcast here
        node = self.gm.graph.get_attr(name)
        node.meta["val"] = getattr(self.gm, name)
        out.nodes.append(node)
        return node


def _unique_attr(gm: nn.Module, base: str) -> str:
    name, index = base, 0
    while hasattr(gm, name):
        index += 1
        name = f"{base}_{index}"
    return name


def remove_dead_code(gm: fx.GraphModule) -> None:
    """Drop unused nodes, then the parameters and buffers no node reads any more."""
    gm.graph.eliminate_dead_code()
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    used = {node.target for node in gm.graph.nodes if node.op == "get_attr"}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name not in used:
            owner_path, _, attr = name.rpartition(".")
            owner = gm.get_submodule(owner_path) if owner_path else gm
            delattr(owner, attr)
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
