"""The input rules of ``repfx.capture.inputs``: one helper per job, each pinned by a case that can fail.

Normalising (a lone tensor is one argument), the user's placeholders (not the program's
parameters, buffers or constants), symbolic sizes at their hints, the batch rule, and the
draws: seeded and reproducible, integer inputs never drawn, dtypes and devices kept, the
same values the CLI and the torch-tensorrt hook drew before the rules moved here.
"""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from repfx.capture.inputs import (
    InputSpec,
    as_input_tuple,
    example_batch_size,
    is_batched,
    placeholder_specs,
    random_inputs,
    random_like,
    recorded_inputs,
    size_hint,
    user_input_nodes,
    with_batch,
)

X = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
GAIN = torch.randn(1, 3, 1, 1, generator=torch.Generator().manual_seed(2))
IDS = torch.tensor([[1, 2], [3, 4]])
BY_NAME = {"x": X}


class WithState(nn.Module):
    """A parameter, a buffer and a tensor constant besides two user inputs: all are placeholders."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.register_buffer("offset", torch.ones(3, 1, 1))
        self.table = torch.arange(3.0).reshape(3, 1, 1)  # a plain tensor attribute: a lifted constant

    def forward(self, x: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * gain + self.offset + self.table


@pytest.fixture(scope="module")
def program() -> torch.export.ExportedProgram:
    return torch.export.export(WithState().eval(), (X, GAIN))


@pytest.fixture(scope="module")
def dynamic_program() -> torch.export.ExportedProgram:
    batch = torch.export.Dim("batch", min=1, max=64)
    return torch.export.export(WithState().eval(), (X, GAIN), dynamic_shapes=({0: batch}, None))


# --- normalising ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("given, expected", [
    pytest.param(X, (X,), id="lone-tensor"),
    pytest.param([X, GAIN], (X, GAIN), id="list"),
    pytest.param((X, GAIN), (X, GAIN), id="tuple"),
    pytest.param(BY_NAME, (BY_NAME,), id="dict-is-one-argument"),
    pytest.param(3, (3,), id="scalar"),
])
def test_as_input_tuple(given, expected):
    result = as_input_tuple(given)
    assert isinstance(result, tuple) and len(result) == len(expected)
    assert all(a is b for a, b in zip(result, expected))


# --- placeholders and sizes -----------------------------------------------------------------------------------------

def test_user_input_nodes_are_the_inputs_not_the_weights(program):
    placeholders = [node.name for node in program.graph.nodes if node.op == "placeholder"]
    assert len(placeholders) == 6, placeholders  # weight, bias, buffer, constant, then the two inputs
    nodes = user_input_nodes(program)
    assert [node.name for node in nodes] == list(program.graph_signature.user_inputs) == ["x", "gain"]
    assert [tuple(node.meta["val"].shape) for node in nodes] == [tuple(X.shape), tuple(GAIN.shape)]


def test_size_hint_reads_symbolic_sizes_at_their_example_value(dynamic_program):
    x, gain = (node.meta["val"] for node in user_input_nodes(dynamic_program))
    assert isinstance(x.shape[0], torch.SymInt)
    assert [size_hint(size) for size in x.shape] == [2, 3, 4, 4]
    assert [size_hint(size) for size in gain.shape] == [1, 3, 1, 1]


def test_size_hint_is_none_without_a_hint():
    unbacked = ShapeEnv().create_unbacked_symint()
    assert size_hint(unbacked) is None
    assert size_hint(7) == 7


def test_placeholder_specs_keep_shape_dtype_device(dynamic_program):
    specs = placeholder_specs(user_input_nodes(dynamic_program))
    assert specs == [InputSpec((2, 3, 4, 4), torch.float32, torch.device("cpu")),
                     InputSpec((1, 3, 1, 1), torch.float32, torch.device("cpu"))]


def test_placeholder_specs_refuse_a_placeholder_without_tensor_value():
    graph = fx.Graph()
    tensor, count = graph.placeholder("x"), graph.placeholder("n")
    tensor.meta["val"], count.meta["val"] = torch.empty(2, 3), 3
    graph.output(tensor)
    assert placeholder_specs([tensor]) == [InputSpec((2, 3), torch.float32, torch.device("cpu"))]
    assert placeholder_specs([tensor, count]) is None


# --- the batch --------------------------------------------------------------------------------------------------------

def test_batch_rule_follows_the_first_tensor():
    inputs = (3, X, GAIN, IDS)
    size = example_batch_size(inputs)
    assert size == 2
    assert [is_batched(leaf, size) for leaf in inputs] == [False, True, False, True]


def test_with_batch_repeats_rows():
    assert torch.equal(with_batch(IDS, 3), torch.tensor([[1, 2], [3, 4], [1, 2]]))


# --- synthesis --------------------------------------------------------------------------------------------------------

def test_random_inputs_are_reproducible_per_seed():
    specs = [InputSpec((2, 3)), InputSpec((4,))]
    first, again, other = random_inputs(specs, 0), random_inputs(specs, 0), random_inputs(specs, 1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])
    assert not torch.equal(first[0][0, :2], first[1][:2]), "one generator, consumed in order"


def test_random_inputs_draw_what_the_cli_drew():
    """The CLI's inputs (and so its outputs) are the same as before the rule moved: randn, one generator, cast."""
    generator = torch.Generator().manual_seed(5)
    expected = (torch.randn((1, 3, 8, 8), generator=generator).to(torch.float16),
                torch.zeros((1, 5), dtype=torch.int64),
                torch.randn((2,), generator=generator))
    drawn = random_inputs([InputSpec((1, 3, 8, 8), torch.float16), InputSpec((1, 5), torch.int64),
                           InputSpec((2,))], 5)
    for got, want in zip(drawn, expected):
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_random_inputs_keep_device():
    (tensor,) = random_inputs([InputSpec((2, 2), torch.bfloat16, "meta")], 0)
    assert tensor.device.type == "meta" and tensor.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_random_inputs_never_draw_integer_inputs(dtype):
    (tensor,) = random_inputs([InputSpec((3, 4), dtype)], 0)
    assert tensor.dtype == dtype and not tensor.any()


def test_random_like_is_reproducible_and_keeps_integers():
    examples = (X, IDS, 0.5)
    first, again = random_like(examples, 0), random_like(examples, 0)
    assert torch.equal(first[0], again[0]) and not torch.equal(first[0], X)
    assert first[1] is IDS, "integer inputs keep their values"
    assert first[2] == 0.5, "leaves that are not tensors stay as they are"
    assert torch.equal(first[0], torch.randn(X.shape, generator=torch.Generator().manual_seed(0)))


def test_random_like_resizes_only_batched_inputs():
    x, gain, ids = random_like((X, GAIN, IDS), 3, batch=5)
    assert x.shape == (5, 3, 4, 4)
    assert gain.shape == GAIN.shape, "a [1, C, 1, 1] side input broadcasts over the batch"
    assert torch.equal(ids, with_batch(IDS, 5)), "integer ids repeat their own rows"


def test_random_like_keeps_dtype_and_nesting():
    half = X.half()
    (nested,) = random_like(({"a": half, "b": [IDS]},), 0)
    assert nested["a"].dtype == torch.float16 and nested["a"].shape == half.shape
    assert nested["b"][0] is IDS


def test_recorded_inputs_prefer_the_stored_examples(program):
    stored = recorded_inputs(program)
    assert len(stored) == 2 and torch.equal(stored[0], X) and torch.equal(stored[1], GAIN)


def test_recorded_inputs_else_zeros_like_the_user_inputs(dynamic_program, monkeypatch):
    monkeypatch.setattr(type(dynamic_program), "example_inputs", property(lambda self: None))
    zeros = recorded_inputs(dynamic_program)
    assert [tuple(t.shape) for t in zeros] == [(2, 3, 4, 4), (1, 3, 1, 1)], "the weights are not inputs"
    assert all(t.dtype == torch.float32 and not t.any() for t in zeros)
