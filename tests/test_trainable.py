"""Sparse fine-tuning (``trainable=``): the same gradients as eager with the same
parameters frozen, frozen parameters and channels never change, and the pruned graph
saves fewer tensors and does fewer FLOPs.

Eager reference: frozen parameters get ``requires_grad=False``; for partly trained
weights, eager's full gradient with the frozen rows zeroed.
"""

from __future__ import annotations

import copy
import fnmatch
import json

import pytest
import torch
from torch import nn

import graphopt
from conftest import assert_grads_equal, training_step
from graphopt.plan import Plan
from graphopt.trainable import graph_trainable, last_blocks, parse_trainable, trainable_rows


class Block(nn.Module):
    def __init__(self, width: int = 32, hidden: int = 64):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


class Stack(nn.Module):
    """An embedding-free stack of residual MLP blocks with a head; batch (4, 16, 32)."""

    def __init__(self, depth: int = 4, width: int = 32):
        super().__init__()
        self.inp = nn.Linear(width, width)
        self.layers = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x).square().mean()


class GraphBreakStack(Stack):
    """Two graphs. (A break inside a loop would make Dynamo run the loop's frame
    eagerly, outside graphopt, where nothing is pruned.)"""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers[1](self.layers[0](self.inp(x)))
        torch._dynamo.graph_break()
        return self.head(self.layers[3](self.layers[2](x))).square().mean()


def _inputs() -> tuple[torch.Tensor]:
    return (torch.randn(4, 16, 32, generator=torch.Generator().manual_seed(1)),)


def _pair(model_class=Stack, trained=None, *, seed: int = 0):
    """An eager model with the untrained parameters frozen by requires_grad, and a copy."""
    torch.manual_seed(seed)
    eager = model_class()
    ours = copy.deepcopy(eager)
    for name, parameter in eager.named_parameters():
        parameter.requires_grad_(trained(name))
    return eager, ours


def _zero_frozen_rows(model: nn.Module, rows: dict[str, int]) -> None:
    for name, parameter in model.named_parameters():
        if name in rows and parameter.grad is not None:
            parameter.grad[rows[name] :] = 0


@pytest.mark.parametrize(
    ("trainable", "trained"),
    [
        ("bias", lambda name: name.endswith(".bias")),
        ("layers.3.*", lambda name: name.startswith("layers.3.")),
        ({"last_blocks": 2}, lambda name: name.startswith(("layers.2.", "layers.3."))),
    ],
    ids=["bias", "glob", "last-2-blocks"],
)
def test_gradients_equal_eager_with_the_same_parameters_frozen(trainable, trained):
    eager, ours = _pair(trained=trained)
    compiled = graphopt.compile(ours, compiler="eager", trainable=trainable)
    inputs = _inputs()
    torch.testing.assert_close(training_step(compiled, inputs), training_step(eager, inputs))
    assert_grads_equal(eager, ours)
    assert any(p.grad is None for p in ours.parameters()), "something must be frozen"
    assert all(p.requires_grad for p in ours.parameters()), "the user's model keeps requires_grad"
    pruning = graphopt.plans(compiled)[0].pruning
    assert pruning.saved_bytes_after < pruning.saved_bytes_before
    assert pruning.backward_flops_after < pruning.backward_flops_before
    assert pruning.backward_nodes_after < pruning.backward_nodes_before


def test_partial_channels_compute_only_the_trained_rows():
    spec = {"layers.*.up.weight": 0.25, "head.weight": 0.5, "layers.*.up.bias": 0.25}
    rows = {**{f"layers.{i}.up.weight": 16 for i in range(4)}, **{f"layers.{i}.up.bias": 16 for i in range(4)}}
    rows["head.weight"] = 4
    eager, ours = _pair(trained=lambda name: any(fnmatch.fnmatch(name, pattern) for pattern in spec))
    compiled = graphopt.compile(ours, compiler="eager", trainable=spec)
    inputs = _inputs()
    training_step(compiled, inputs)
    training_step(eager, inputs)
    _zero_frozen_rows(eager, rows)
    assert_grads_equal(eager, ours)
    for name, parameter in ours.named_parameters():
        if name in rows:
            assert parameter.grad[: rows[name]].abs().sum() > 0
    pruning = graphopt.plans(compiled)[0].pruning
    assert set(pruning.partial_parameters) == set(rows)
    # Against training the same parameters whole, only the sliced weight-gradient mms
    # shrink: 3/4 of four (64 x 32) up-projections and 1/2 of the (8 x 32) head, 64 tokens.
    whole = graphopt.compile(copy.deepcopy(ours), compiler="eager", trainable=dict.fromkeys(spec, 1.0))
    training_step(whole, inputs)
    whole_flops = graphopt.plans(whole)[0].pruning.backward_flops_after
    tokens = 4 * 16
    assert whole_flops - pruning.backward_flops_after == 3 / 4 * 4 * (2 * tokens * 64 * 32) + 1 / 2 * (2 * tokens * 8 * 32)


def test_rows_and_last_blocks():
    assert trainable_rows(0.3, (10, 4)) == 3
    assert trainable_rows(0.01, (10,)) == 1
    names = [f"blocks.{i}.w" for i in range(3)] + ["head.w", "blocks.0.inner.0.w", "blocks.0.inner.1.w"]
    assert last_blocks(names, 2) == ["blocks.1.w", "blocks.2.w"]


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
        lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.0),
    ],
    ids=["sgd-momentum", "adamw"],
)
def test_frozen_parameters_and_rows_never_change(make_optimizer):
    torch.manual_seed(0)
    model = Stack()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    compiled = graphopt.compile(model, compiler="eager", trainable={"layers.3.*": 1.0, "layers.[0-2].up.weight": 0.25})
    optimizer = make_optimizer(model.parameters())
    for _ in range(3):
        optimizer.zero_grad(set_to_none=True)
        training_step(compiled, _inputs())
        optimizer.step()
    for name, parameter in model.named_parameters():
        if name.startswith("layers.3."):
            assert not torch.equal(parameter, before[name]), name
        elif fnmatch.fnmatch(name, "layers.[0-2].up.weight"):
            torch.testing.assert_close(parameter[16:], before[name][16:], rtol=0, atol=0)
            assert not torch.equal(parameter[:16], before[name][:16]), name
        else:
            torch.testing.assert_close(parameter, before[name], rtol=0, atol=0)


def test_weight_decay_on_partly_trained_parameters_is_refused():
    """Decay would shrink the frozen rows; whole frozen parameters have no gradient and are skipped."""
    torch.manual_seed(0)
    model = Stack()
    compiled = graphopt.compile(model, compiler="eager", trainable={"head.weight": 0.5, "layers.0.*": 1.0})
    training_step(compiled, _inputs())
    decayed = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    with pytest.raises(graphopt.GraphoptError, match="weight_decay=0"):
        decayed.step()
    head = [model.head.weight]
    rest = [p for p in model.parameters() if p is not model.head.weight]
    frozen_before = model.layers[1].up.weight.detach().clone()
    split = torch.optim.AdamW([{"params": head, "weight_decay": 0.0}, {"params": rest, "weight_decay": 0.1}], lr=0.01)
    split.step()
    torch.testing.assert_close(model.layers[1].up.weight, frozen_before, rtol=0, atol=0)


def test_graph_breaks_map_each_graph_to_its_own_inputs():
    trained = lambda name: name.startswith(("layers.0.", "layers.3."))  # noqa: E731 - one graph each
    eager, ours = _pair(GraphBreakStack, trained)
    compiled = graphopt.compile(ours, compiler="eager", trainable=["layers.0.*", "layers.3.*"])
    inputs = _inputs()
    torch.testing.assert_close(training_step(compiled, inputs), training_step(eager, inputs))
    assert_grads_equal(eager, ours)
    plans = graphopt.plans(compiled)
    assert len(plans) == 2
    assert all(plan.pruning is not None and plan.pruning.frozen_parameters for plan in plans)


def test_a_graph_left_without_gradients_is_split_by_torch():
    """Everything graph 0 reads is frozen: it computes no gradient, so torch's default
    partitioner splits it and it has no plan."""
    eager, ours = _pair(GraphBreakStack, lambda name: name.startswith("layers.3."))
    compiled = graphopt.compile(ours, compiler="eager", trainable="layers.3.*")
    inputs = _inputs()
    torch.testing.assert_close(training_step(compiled, inputs), training_step(eager, inputs))
    assert_grads_equal(eager, ours)
    assert [plan.graph for plan in graphopt.plans(compiled)] == ["graph_1"]


def test_an_input_that_is_not_its_primal_is_refused(monkeypatch):
    """If AOTAutograd's primals were not Dynamo's inputs one for one, graphopt must not guess."""
    from graphopt import backend
    from graphopt.trainable import GraphTrainable

    def shifted(*args):
        mapped = graph_trainable(*args)
        return GraphTrainable(mapped.rows, mapped.names, mapped.input_shapes[1:] + mapped.input_shapes[:1])

    monkeypatch.setattr(backend, "graph_trainable", shifted)
    torch.manual_seed(0)
    compiled = graphopt.compile(Stack(), compiler="eager", trainable="bias")
    with pytest.raises(graphopt.GraphoptError, match="do not map one for one"):
        training_step(compiled, _inputs())


def test_torch_compile_backend_reads_names_from_dynamo():
    eager, ours = _pair(trained=lambda name: name.endswith(".bias"))
    compiled = torch.compile(ours, backend="graphopt", options={"compiler": "eager", "trainable": "bias"})
    inputs = _inputs()
    torch.testing.assert_close(training_step(compiled, inputs), training_step(eager, inputs))
    assert_grads_equal(eager, ours)


def test_plan_reports_and_round_trips_the_pruning():
    torch.manual_seed(0)
    compiled = graphopt.compile(Stack(), compiler="eager", trainable="bias")
    training_step(compiled, _inputs())
    plan = graphopt.plans(compiled)[0]
    assert "sparse backward" in str(plan)
    loaded = Plan.from_json(json.loads(plan.dumps()))
    assert loaded.pruning == plan.pruning
    assert "layers.0.up.weight" in plan.pruning.frozen_parameters


def test_all_means_no_pruning():
    torch.manual_seed(0)
    compiled = graphopt.compile(Stack(), compiler="eager", trainable="all")
    training_step(compiled, _inputs())
    assert graphopt.plans(compiled)[0].pruning is None


@pytest.mark.parametrize(
    ("trainable", "message"),
    [
        ("nothing.*", "matched no parameter"),
        ({"layers.*.up.weight": 0.0}, r"in \(0, 1\]"),
        ({"layers.*.up.weight": 1.5}, r"in \(0, 1\]"),
        ({"last_blocks": 0}, "positive int"),
        ({"last_blocks": 9}, "has 4"),
        ("layers.0.norm.running_mean", "matched no parameter"),
        (42, "not understood"),
        ({"layers.0.*": 0.5, "layers.0.up.*": 1.0}, "different fractions"),
    ],
)
def test_bad_trainable_values_raise(trainable, message):
    with pytest.raises(graphopt.GraphoptError, match=message):
        graphopt.compile(Stack(), compiler="eager", trainable=trainable)


def test_a_buffer_is_named_as_such():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    with pytest.raises(graphopt.GraphoptError, match="names buffers"):
        graphopt.compile(model, compiler="eager", trainable="1.running_*")


def test_the_spec_is_hashable_for_cache_keys():
    assert hash(parse_trainable({"a.*": 0.5, "last_blocks": 2})) == hash(parse_trainable({"a.*": 0.5, "last_blocks": 2}))
    assert parse_trainable("all") is None


@pytest.mark.inductor
def test_inductor_partial_channels_and_frozen_parameters():
    spec = {"layers.3.*": 1.0, "layers.[0-2].up.weight": 0.25}
    rows = {f"layers.{i}.up.weight": 16 for i in range(3)}
    trained = lambda name: name.startswith("layers.3.") or name in rows  # noqa: E731
    eager, ours = _pair(trained=trained)
    compiled = graphopt.compile(ours, trainable=spec)
    inputs = _inputs()
    torch.testing.assert_close(training_step(compiled, inputs), training_step(eager, inputs))
    _zero_frozen_rows(eager, rows)
    assert_grads_equal(eager, ours)
