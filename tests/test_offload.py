"""Offloading saved tensors: the ops, the cost model, the program's choices, and training
steps whose gradients equal eager (on CPU the copies are host-to-host)."""

import copy
import dataclasses
import functools
import sys

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

import graphopt
from graphopt.alternatives import AlternativePricer, Lifetime
from graphopt.config import make_options
from graphopt.cost_models import get_hardware
from graphopt.ops import offload as offload_ops
from graphopt.passes.hoist_prefetches import hoist_prefetches
from graphopt.planner import alternative_settings
from graphopt.problem import KEEP, OFFLOAD, OFFLOAD_QUANTIZED, Candidate, Problem
from graphopt.solver import solve

from conftest import assert_same_training_step, training_step

MB = 2**20


# ----------------------------------------------------------------------------- ops


def test_ops_round_trip_on_cpu():
    x = torch.randn(64, 32).t()  # strided: the copies keep the layout
    host = offload_ops.WAIT(offload_ops.OFFLOAD(x), x)
    back = offload_ops.WAIT(offload_ops.PREFETCH(host, x.device), host)
    assert torch.equal(back, x) and back.stride() == x.stride()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the side-stream copy and pinned memory")
def test_ops_round_trip_on_cuda():
    x = torch.randn(1024, 1024, device="cuda")
    host = offload_ops.OFFLOAD(x)
    assert host.device.type == "cpu" and host.is_pinned()
    host = offload_ops.WAIT(host, x)
    back = offload_ops.WAIT(offload_ops.PREFETCH(host, x.device), host)
    assert back.device == x.device and torch.equal(back, x)


# ----------------------------------------------------------------------------- cost model


def _pricer(hardware: str, step_ms: float = 1.0, steps: int = 20, forward: int = 10) -> AlternativePricer:
    return AlternativePricer(get_hardware(hardware), [step_ms] * steps, forward)


def test_offload_hidden_behind_enough_compute():
    value = torch.empty(64 * MB // 4, device="meta")  # 64 MiB: ~1.2 ms over a 55 GB/s link
    lifetime = Lifetime(produced=2, free_at=3, first_use=15, last_use=17)
    (alternative,) = _pricer("h100").alternatives(value, lifetime, bits=(), offload=True)
    assert alternative.kind == OFFLOAD and alternative.added_ms == 0
    prefetch_at = alternative.intervals[-1][0]
    assert 10 <= prefetch_at < 15  # started ahead of the first use, inside the backward
    assert alternative.intervals[-1][1:] == (17, 64 * MB)


def test_offload_exposed_without_compute():
    value = torch.empty(64 * MB // 4, device="meta")
    lifetime = Lifetime(produced=2, free_at=3, first_use=15, last_use=17)
    (alternative,) = _pricer("h100", step_ms=0.0).alternatives(value, lifetime, bits=(), offload=True)
    transfer_ms = 64 * MB / get_hardware("h100").host_link_bytes_per_s * 1e3
    assert alternative.added_ms == pytest.approx(2 * transfer_ms)


def test_offloading_a_quantized_copy_moves_fewer_bytes():
    value = torch.empty(64 * MB // 4, device="meta")
    lifetime = Lifetime(produced=2, free_at=3, first_use=15, last_use=17)
    found = _pricer("h100", step_ms=0.0).alternatives(value, lifetime, bits=(8,), offload=True)
    by_kind = {a.kind: a for a in found}
    assert by_kind[OFFLOAD_QUANTIZED].bits == 8 and by_kind[OFFLOAD_QUANTIZED].error > 0
    assert by_kind[OFFLOAD_QUANTIZED].added_ms < by_kind[OFFLOAD].added_ms


def test_no_offload_on_a_cpu_profile():
    assert not alternative_settings(make_options(hardware="cpu")).offload
    assert alternative_settings(make_options(hardware="h100")).offload
    assert alternative_settings(make_options(hardware="h100")).quantize_bits == ()  # exact by default


def test_program_offloads_when_the_link_hides_it():
    value = torch.empty(10 * MB // 4, device="meta")
    pricer = _pricer("h100", steps=8, forward=4)
    candidates = []
    for k in range(4):
        use = 4 + (3 - k)
        lifetime = Lifetime(produced=k, free_at=k, first_use=use, last_use=use)
        candidates.append(
            Candidate(f"a{k}", 10 * MB, 50.0, (), k, use, use, True,
                      alternatives=pricer.alternatives(value, lifetime, bits=(), offload=True))
        )  # fmt: skip
    loose = solve(Problem(tuple(candidates), (0,) * 8, 4, 100 * MB))
    tight = solve(Problem(tuple(candidates), (0,) * 8, 4, 25 * MB))
    assert loose.actions == (KEEP,) * 4
    assert OFFLOAD in tight.actions and tight.peak_bytes <= 25 * MB and tight.added_ms < 50.0


# ----------------------------------------------------------------------------- training steps


def _offload_matmuls(ctx, op, *args, **kwargs):
    if op in (torch.ops.aten.addmm.default, torch.ops.aten.mm.default):
        return CheckpointPolicy.MUST_CPU_OFFLOAD
    return CheckpointPolicy.PREFER_SAVE


class _Checkpointed(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(64, 512), nn.GELU(), nn.Linear(512, 64)) for _ in range(2))

    def forward(self, x):
        context = functools.partial(create_selective_checkpoint_contexts, _offload_matmuls)
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False, context_fn=context)
        return x.square().mean()


INPUTS = (torch.randn(256, 64, generator=torch.Generator().manual_seed(1)),)


def test_must_cpu_offload_policy_is_honoured_and_exact():
    compiled = assert_same_training_step(_Checkpointed, INPUTS)  # hardware "auto": a CPU
    plan = graphopt.plans(compiled)[0]
    offloaded = [d for d in plan.decisions if d.action == "offload"]
    assert len(offloaded) == 4  # both matmuls of both blocks
    assert all("MUST_CPU_OFFLOAD" in d.reason for d in offloaded)
    assert "offload" in str(plan)


def _offload_matmuls_recompute_rest(ctx, op, *args, **kwargs):
    if op in (torch.ops.aten.addmm.default, torch.ops.aten.mm.default):
        return CheckpointPolicy.MUST_CPU_OFFLOAD
    return CheckpointPolicy.PREFER_RECOMPUTE


def test_offloading_a_quantized_copy_under_a_gpu_budget(monkeypatch):
    """Planned for an H100 whose host link (1 GB/s) cannot hide full-width copies (run
    here on CPU, host-to-host) under a budget that needs offloading: quantized copies
    move a quarter of the bytes, so the planner offloads some; gradients stay close to
    eager's. (At the H100's own link plain offloads fit this budget at the same peak.)"""
    monkeypatch.setattr(sys.modules[__name__], "_offload_matmuls", _offload_matmuls_recompute_rest)
    torch.manual_seed(0)
    model = _Checkpointed()
    reference = copy.deepcopy(model)
    slow_link = dataclasses.replace(get_hardware("h100"), host_link_bytes_per_s=1e9)
    compiled = graphopt.compile(model, compiler="eager", hardware=slow_link, quantize_bits=8, memory_budget=2_200_000)
    training_step(compiled, INPUTS)
    training_step(reference, INPUTS)
    plan = graphopt.plans(compiled)[0]
    assert any(d.action == "offload-quantized" and d.bits == 8 for d in plan.decisions)
    assert plan.predicted_peak_bytes <= 2_200_000
    exact = torch.cat([p.grad.flatten() for p in reference.parameters()])
    lossy = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert torch.nn.functional.cosine_similarity(exact, lossy, dim=0) >= 0.999


def _offload_matmuls_must_recompute_rest(ctx, op, *args, **kwargs):
    if op in (torch.ops.aten.addmm.default, torch.ops.aten.mm.default):
        return CheckpointPolicy.MUST_CPU_OFFLOAD
    return CheckpointPolicy.MUST_RECOMPUTE


def test_recomputation_reads_the_prefetched_tensor(monkeypatch):
    """GELU's internals must be recomputed from the offloaded matmul output: the rewrite
    recomputes them from the prefetched copy, and the step stays exact."""
    monkeypatch.setattr(sys.modules[__name__], "_offload_matmuls", _offload_matmuls_must_recompute_rest)
    compiled = assert_same_training_step(_Checkpointed, INPUTS)
    actions = {d.action for d in graphopt.plans(compiled)[0].decisions}
    assert actions == {"offload", "recompute"}


def test_offloading_rms_norm_inputs_keeps_the_graph_in_order():
    """LLaMA's RMSNorm leaves an ``alias`` of its statistic in the forward's part of the
    joint graph that only the backward reads; once it reads a restored tensor it must move
    after it. The least-peak plans for an H100 offload such tensors: planning them raised
    KeyError in the split before the rewrite was sorted topologically."""
    from examples.llama7b import build
    from graphopt.offline import plan_model

    with torch.device("meta"):
        model, inputs = build(batch=1, seq=128, n_layers=1, d_model=256, n_heads=4, hidden=512, vocab=1000)
    with pytest.raises(graphopt.BudgetInfeasibleError, match="least budget it can meet"):
        plan_model(model, inputs, memory_budget=1, hardware="h100")


# ----------------------------------------------------------------------------- placement


def _backward_with_a_prefetch(compute_nodes: int) -> tuple[torch.fx.GraphModule, torch.fx.Node]:
    """host, x placeholders; `compute_nodes` ops on x; then prefetch(host), wait, a use."""
    graph = torch.fx.Graph()
    host = graph.placeholder("host")
    host.meta["val"] = torch.empty(MB // 4, device="meta")  # 1 MiB
    x = graph.placeholder("x")
    for _ in range(compute_nodes):
        x = graph.call_function(torch.ops.aten.sin.default, (x,))
    back = graph.call_function(offload_ops.PREFETCH, (host, torch.device("cpu")))
    back.meta["val"] = host.meta["val"]
    ready = graph.call_function(offload_ops.WAIT, (back, host))
    graph.output(graph.call_function(torch.ops.aten.add.Tensor, (ready, x)))
    return torch.fx.GraphModule(torch.nn.Module(), graph), back


def test_prefetch_is_hoisted_until_compute_hides_the_copy():
    """1 MiB over a 1 GiB/s link is ~0.98 ms; at 0.4 ms per op three ops hide it, so the
    copy starts three ops before its wait, not next to it."""
    module, prefetch = _backward_with_a_prefetch(compute_nodes=5)
    levels = [0, 0, 0, 0, 0, 0, 0, MB, MB, 2 * MB, 0]  # the peak is the last add's
    moved = hoist_prefetches(module, lambda node: 0.4, 2**30, timeline=lambda graph_module: levels)
    order = list(module.graph.nodes)
    assert moved == 1
    wait = next(iter(prefetch.users))
    assert order.index(prefetch) == order.index(wait) - 4  # 3 sines between
    x, host = torch.randn(MB // 4), torch.randn(MB // 4)
    assert torch.equal(module(host, x), host + x.sin().sin().sin().sin().sin())


def test_a_prefetch_no_compute_can_hide_stays_at_its_use():
    """Hoisted to the top it would hide a fifth of the copy and hold 1 MiB all along."""
    module, prefetch = _backward_with_a_prefetch(compute_nodes=2)
    assert hoist_prefetches(module, lambda node: 0.1, 2**30, timeline=lambda graph_module: []) == 0
    assert prefetch.next.target is offload_ops.WAIT


def test_a_prefetch_that_would_raise_the_peak_stays_at_its_use():
    """The graph peaks (10 MiB) at the fourth sine, where the early copy would also be."""
    module, prefetch = _backward_with_a_prefetch(compute_nodes=5)
    levels = [0, 0, 0, 0, 0, 10 * MB, 0, MB, MB, 0, 0]  # host, x, 5 sines, prefetch, wait, add, output

    assert hoist_prefetches(module, lambda node: 0.4, 2**30, timeline=lambda graph_module: levels) == 0
    assert prefetch.next.target is offload_ops.WAIT


def test_a_prefetch_moves_when_the_steps_it_spans_have_room():
    """The same graph peaking before the copy's start: it moves, and a second copy over
    the same steps would see the first's bytes (one simulation for all moves)."""
    module, prefetch = _backward_with_a_prefetch(compute_nodes=5)
    levels = [0, 0, 0, 10 * MB, 0, 0, 0, MB, MB, 0, 0]

    assert hoist_prefetches(module, lambda node: 0.4, 2**30, timeline=lambda graph_module: levels) == 1
