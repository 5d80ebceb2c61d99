"""Memory-aware reordering (graphopt/passes/reorder_graph.py): valid orders, same results, never a
higher simulated peak, a lower one where order matters, and the `reorder` option.

Synthetic graphs are traced with ``make_fx`` on fake tensors (so nodes carry the
``meta["val"]`` the memory model reads) and run on real tensors before and after.
"""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch
from torch import nn
from torch._inductor.custom_graph_pass import CustomSchedulerPass
from torch.fx.experimental.proxy_tensor import make_fx

import graphopt
from conftest import assert_grads_equal, assert_same_training_step, training_step
from graphopt.cost_models.memory import graph_timeline
from graphopt.passes.reorder_graph import ORIGINAL, reorder_graph
from graphopt.plan import Plan

SIZE = 64  # every synthetic tensor is SIZE x SIZE fp32: 16 KiB


def _trace(fn, inputs):
    return make_fx(fn, tracing_mode="fake")(*inputs)


def _peak(graph_module, input_storage=None) -> int:
    return max(graph_timeline(graph_module, input_storage))


def _assert_topological(graph_module) -> None:
    """Every node after what it reads; placeholders first, the output last."""
    nodes = list(graph_module.graph.nodes)
    seen = set()
    for index, node in enumerate(nodes):
        assert all(source in seen for source in node.all_input_nodes), f"{node} runs before an input"
        if node.op == "placeholder":
            assert all(n.op == "placeholder" for n in nodes[:index])
        seen.add(node)
    assert nodes[-1].op == "output"


# ----------------------------------------------------------------------------- a graph where order matters


def _branches(x, *weights):
    """All expansions first, then all reductions: every big temporary is alive at once.
    Finishing each branch before the next keeps one alive."""
    expanded = [torch.mm(x, w).relu().mm(w) for w in weights]
    return tuple(e.sum(0) for e in expanded)


def test_independent_branches_are_finished_one_at_a_time():
    inputs = [torch.randn(1024, SIZE)] + [torch.randn(SIZE, SIZE) for _ in range(4)]
    graph_module = _trace(_branches, inputs)
    expected = graph_module(*inputs)
    before = _peak(graph_module)

    result = reorder_graph(graph_module)

    _assert_topological(graph_module)
    assert result.reordered and result.peak_before_bytes == before
    assert result.peak_after_bytes == _peak(graph_module)
    big = 1024 * SIZE * 4
    # All four branches' (1024 x 64) temporaries were alive at once; now one branch's two (mm, relu).
    assert before >= 4 * big
    assert result.peak_after_bytes <= 2 * big + 4 * SIZE * 4
    for got, want in zip(graph_module(*inputs), expected):
        assert torch.equal(got, want)


# ----------------------------------------------------------------------------- random graphs


def _random_program(seed: int, *, with_random_ops: bool):
    """A random DAG of SIZE x SIZE ops over three inputs, returning several of its values."""
    rng = random.Random(seed)
    steps = []
    for index in range(40):
        operands = [rng.randrange(3 + index) for _ in range(2)]
        kinds = ["mm", "add", "mul", "relu", "tanh", "sum"] + (["rand"] if with_random_ops else [])
        steps.append((rng.choice(kinds), operands))
    outputs = sorted(rng.sample(range(3, 43), 5))

    def program(a, b, c):
        values = [a, b, c]
        for kind, (i, j) in steps:
            x, y = values[i], values[j]
            values.append(
                {
                    "mm": lambda: torch.mm(x, y),
                    "add": lambda: x + y,
                    "mul": lambda: x * y,
                    "relu": lambda: x.relu(),
                    "tanh": lambda: x.tanh(),
                    "sum": lambda: x.sum(0, keepdim=True).expand(SIZE, SIZE) + y,
                    "rand": lambda: torch.rand_like(x) * y,
                }[kind]()
            )
        return tuple(values[i] for i in outputs)

    return program


@pytest.mark.parametrize("seed", range(12))
def test_random_graphs_stay_valid_equal_and_never_peak_higher(seed):
    inputs = [torch.randn(SIZE, SIZE) / SIZE**0.5 for _ in range(3)]
    graph_module = _trace(_random_program(seed, with_random_ops=seed % 3 == 0), inputs)
    # Odd seeds: the graph owns its inputs (as the backward owns its saved tensors).
    owned = {p.name: p.name for p in graph_module.graph.find_nodes(op="placeholder")} if seed % 2 else None
    torch.manual_seed(seed)
    expected = graph_module(*inputs)
    before = _peak(graph_module, owned)

    result = reorder_graph(graph_module, owned)

    _assert_topological(graph_module)
    assert result.peak_after_bytes == _peak(graph_module, owned) <= before == result.peak_before_bytes
    assert min(result.peaks_bytes.values()) == result.peak_after_bytes
    torch.manual_seed(seed)
    for got, want in zip(graph_module(*inputs), expected):
        assert torch.equal(got, want)  # same ops on the same values, random draws in the same order


def test_random_ops_keep_their_order_and_nothing_crosses_an_in_place_write():
    def program(x, state, *weights):
        big = [torch.mm(x, w) for w in weights]
        noise = [torch.rand_like(b) for b in big]
        state.copy_(big[0][:SIZE])  # an in-place write: a barrier
        after = [torch.mm(x, w).sum(0) for w in weights]
        return tuple(n.sum(0) for n in noise) + tuple(after)

    inputs = [torch.randn(512, SIZE), torch.zeros(SIZE, SIZE)] + [torch.randn(SIZE, SIZE) for _ in range(3)]
    graph_module = _trace(program, inputs)
    original = list(graph_module.graph.nodes)
    write = next(n for n in original if n.target is torch.ops.aten.copy_.default)
    before_write = set(original[: original.index(write)])
    random_order = [n for n in original if n.target is torch.ops.aten.rand_like.default]

    reorder_graph(graph_module)

    nodes = list(graph_module.graph.nodes)
    assert set(nodes[: nodes.index(write)]) == before_write
    assert [n for n in nodes if n.target is torch.ops.aten.rand_like.default] == random_order


# ----------------------------------------------------------------------------- through graphopt.compile


class _TinyGPT(nn.Module):
    def __init__(self):
        super().__init__()
        from examples.gpt import build

        self.gpt, _ = build(batch=2, seq=64, n_layers=2, d_model=64, n_heads=2, vocab=128)

    def forward(self, idx, targets):
        return self.gpt(idx, targets)


def _gpt_inputs():
    generator = torch.Generator().manual_seed(0)
    return tuple(torch.randint(0, 128, (2, 64), generator=generator) for _ in range(2))


class _ConvBatchNorm(nn.Module):
    """Conv-BatchNorm-ReLU twice: the forward writes BatchNorm's running statistics in place."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        )
        self.head = nn.Linear(8, 10)

    def forward(self, images, labels):
        return nn.functional.cross_entropy(self.head(self.features(images).mean(dim=(2, 3))), labels)


def _cnn_inputs():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, 16, 16, generator=generator), torch.randint(0, 10, (4,), generator=generator)


@pytest.mark.parametrize("factory, make_inputs", [(_TinyGPT, _gpt_inputs), (_ConvBatchNorm, _cnn_inputs)])
def test_reordered_training_step_equals_eager(factory, make_inputs):
    compiled = assert_same_training_step(factory, make_inputs(), reorder=True)
    (plan,) = graphopt.plans(compiled)
    assert [r.graph for r in plan.reordering] == ["forward", "backward"]
    for reordering in plan.reordering:
        assert reordering.peak_after_bytes <= reordering.peak_before_bytes
        assert reordering.inductor_reorder == (reordering.method == ORIGINAL)
    # The plan's timeline is the simulation of the final order, which gives its peak.
    assert max(plan.timeline_bytes) == plan.predicted_peak_bytes
    assert plan.predicted_peak_bytes == max(r.peak_after_bytes for r in plan.reordering)


def test_gpt_backward_is_reordered_lower_and_off_means_off():
    inputs = _gpt_inputs()
    peaks = {}
    for reorder in (True, False):
        torch._dynamo.reset()
        torch.manual_seed(0)
        compiled = graphopt.compile(_TinyGPT(), compiler="eager", reorder=reorder)
        training_step(compiled, inputs)
        (plan,) = graphopt.plans(compiled)
        peaks[reorder] = plan.predicted_peak_bytes
        if reorder:
            backward = plan.reordering[1]
            assert backward.method != ORIGINAL and backward.peak_after_bytes < backward.peak_before_bytes
            assert "reorder backward" in str(plan)
            assert Plan.from_json(json.loads(plan.dumps())) == plan
        else:
            assert plan.reordering == ()
    assert peaks[True] < peaks[False]


def test_dropout_draws_are_the_same_with_and_without_reordering():
    class DropoutMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(nn.Linear(32, 128), nn.Dropout(0.5), nn.GELU(), nn.Dropout(0.5), nn.Linear(128, 32))

        def forward(self, x):
            return self.layers(x).square().mean()

    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    models, losses = [], []
    for reorder in (True, False):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = DropoutMLP()
        compiled = graphopt.compile(model, compiler="eager", reorder=reorder)
        losses.append(training_step(compiled, (x,), seed=1))
        models.append(model)
    assert torch.equal(losses[0], losses[1])
    assert_grads_equal(models[1], models[0], rtol=0, atol=0)


def test_reorder_option_through_torch_compile_backend():
    model = _ConvBatchNorm()
    options = {"compiler": "eager", "reorder": False}
    compiled = torch.compile(copy.deepcopy(model), backend="graphopt", options=options)
    training_step(compiled, _cnn_inputs())
    from graphopt.backend import session_for_options

    assert all(plan.reordering == () for plan in session_for_options(options).plans)


@pytest.mark.inductor
def test_inductor_keeps_graphopt_order_and_gradients_match_eager():
    """Through Inductor: the reordered backward compiles with Inductor's own reordering off
    and the step still matches eager (Inductor's fused sums: 1e-4 relative, as in test_inductor)."""
    torch.manual_seed(0)
    model = _TinyGPT()
    reference = copy.deepcopy(model)
    inputs = _gpt_inputs()
    compiled = graphopt.compile(model, reorder=True)
    loss = training_step(compiled, inputs)
    expected = training_step(reference, inputs)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert_grads_equal(reference, model, rtol=1e-4, atol=1e-5)
    backward = graphopt.plans(compiled)[0].reordering[1]
    assert backward.method != ORIGINAL and not backward.inductor_reorder


def test_kept_order_still_gives_inductors_buffer_reuse_its_sizes():
    """With its reordering off, Inductor's buffer-reuse guard reads sizes nobody
    assigned (all 0) and lets every reuse through; graphopt assigns them after fusion,
    or turns reuse off where the user's own post-fusion pass is in the way."""
    from torch._inductor import config as inductor_config

    from graphopt import torch_private

    settings = torch_private._buffer_reuse_guard(inductor_config)
    assert isinstance(settings["_post_fusion_custom_pass"], CustomSchedulerPass)
    assert settings["_post_fusion_custom_pass"].uuid()  # a cacheable pass: no FX-cache bypass

    def users_pass(nodes):
        return nodes

    with inductor_config.patch(_post_fusion_custom_pass=users_pass):
        assert torch_private._buffer_reuse_guard(inductor_config) == {"allow_buffer_reuse": False}
