"""graphopt under DDP and FSDP2: 2 CPU processes, gloo (docs/distributed.md).

Each test spawns the two ranks once (``torch.multiprocessing.spawn``) and runs every
case in them; each rank writes what it found to a JSON file the test reads. Every
case compares one step with the same distributed setup without graphopt, on every
rank: the loss, and each gradient as the rank holds it (an FSDP2 gradient is this
rank's shard).
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import graphopt
from graphopt.errors import GraphoptError

WORLD_SIZE = 2
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(nn.functional.gelu(self.up(x)))


class Residual(nn.Module):
    """Residual MLP blocks with the loss inside: each block 2 * 2 * width**2 weights."""

    def __init__(self, width: int, blocks: int):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width) for _ in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x.square().mean()


# ----------------------------------------------------------------------------- ranks


def _ddp(model: nn.Module) -> nn.Module:
    # 1 MB buckets (torch's least first bucket) split this model's gradients into several.
    return nn.parallel.DistributedDataParallel(model, bucket_cap_mb=1)


def _fsdp_whole(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    return fully_shard(model)


def _fsdp_blocks(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block)
    return fully_shard(model)


WRAPS: dict[str, Callable[[nn.Module], nn.Module]] = {"ddp": _ddp, "fsdp": _fsdp_whole, "fsdp-blocks": _fsdp_blocks}


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _step(model: Callable, x: torch.Tensor, parameters: list[nn.Parameter]) -> tuple[float, list[torch.Tensor]]:
    for parameter in parameters:
        parameter.grad = None
    loss = model(x)
    loss.backward()
    return loss.item(), [_local(p.grad).clone() for p in parameters]


def _difference(expected: tuple[float, list[torch.Tensor]], actual: tuple[float, list[torch.Tensor]]) -> str | None:
    """What differs between two steps, or None (the suite's fp32 tolerance)."""
    if not torch.isclose(torch.tensor(actual[0]), torch.tensor(expected[0]), rtol=1e-5, atol=1e-6):
        return f"loss {actual[0]} vs {expected[0]}"
    for index, (want, got) in enumerate(zip(expected[1], actual[1])):
        if not torch.allclose(got, want, rtol=1e-5, atol=1e-6):
            return f"gradient {index}: largest difference {(got - want).abs().max().item():.3g}"
    return None


def _init(rank: int, store: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD_SIZE)


def _gradient_cases(rank: int, store: str, out: str, width: int, blocks: int, batch: int) -> None:
    """Every wrap x entry point x budget on this rank, compared with the wrap without graphopt."""
    _init(rank, store)
    torch.manual_seed(0)
    base = Residual(width, blocks)
    x = torch.randn(batch, width, generator=torch.Generator().manual_seed(rank))
    results = {}
    whole_step_peak = 0  # whole-model FSDP2's unbudgeted plan: the step, every block's saved tensors in it
    warnings = _Messages()
    logging.getLogger("graphopt").addHandler(warnings)
    for wrap_name, wrap in WRAPS.items():
        reference = wrap(copy.deepcopy(base))
        expected = _step(reference, x, list(reference.parameters()))
        unbudgeted_peak = None
        for budgeted in (False, True):
            for entry in ("graphopt.compile", "torch.compile"):
                case = f"{wrap_name} {entry} {'budget' if budgeted else 'no budget'}"
                torch._dynamo.reset()
                model = wrap(copy.deepcopy(base))
                # A budget 10% under the rank's unbudgeted plan makes graphopt recompute. A
                # per-block graph's plan counts one block's run: the step is whole FSDP2's.
                peak = whole_step_peak if wrap_name == "fsdp-blocks" else unbudgeted_peak
                budget = int(0.9 * peak) if budgeted else None
                settings = {"memory_budget": budget, "compiler": "eager"}
                warnings.messages.clear()
                if entry == "graphopt.compile":
                    compiled = graphopt.compile(model, **settings)
                else:
                    compiled = torch.compile(model, backend="graphopt", options=settings)
                try:
                    actual = _step(compiled, x, list(model.parameters()))
                except GraphoptError as error:
                    results[case] = {"error": type(error).__name__, "message": str(error)}
                    continue
                plans = graphopt.plans(compiled) if entry == "graphopt.compile" else []
                if plans and not budgeted:
                    unbudgeted_peak = max(plan.predicted_peak_bytes for plan in plans)
                    whole_step_peak = unbudgeted_peak if wrap_name == "fsdp" else whole_step_peak
                results[case] = {
                    "difference": _difference(expected, actual),
                    "graphs": len(plans),
                    "budget": budget,
                    "predicted": [plan.predicted_peak_bytes for plan in plans],
                    "recomputed": sum(d.action == "recompute" for plan in plans for d in plan.decisions),
                    "earlier runs": [plan.memory.get("its earlier runs", 0) for plan in plans],
                    "warned of rank memory": any("model_static_bytes" in m for m in warnings.messages),
                }
    results["fsdp accumulation"] = _accumulation_case(base, x)
    results["optimizer="] = _optimizer_cases(base, x)
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def _optimizer_cases(base: nn.Module, x: torch.Tensor) -> dict[str, str | None]:
    """optimizer= under each wrap and entry point: the error's message, or None when a
    step ran (an update inside the backward would read a gradient before DDP's
    all-reduce or FSDP2's reduce-scatter, or FSDP2's unsharded copy of a parameter)."""
    found = {}
    for wrap_name, wrap in WRAPS.items():
        for entry in ("graphopt.compile", "torch.compile"):
            torch._dynamo.reset()
            model = wrap(copy.deepcopy(base))
            settings = {"optimizer": torch.optim.SGD(model.parameters(), lr=0.1), "compiler": "eager"}
            try:
                if entry == "graphopt.compile":
                    compiled = graphopt.compile(model, **settings)
                else:
                    compiled = torch.compile(model, backend="graphopt", options=settings)
                _step(compiled, x, list(model.parameters()))
                found[f"{wrap_name} {entry}"] = None
            except GraphoptError as error:
                found[f"{wrap_name} {entry}"] = str(error)
    return found


def _accumulation_case(base: nn.Module, x: torch.Tensor) -> dict:
    """Two micro-batches under FSDP2 with accumulation_steps=2: the gradients alive
    between them are this rank's shards."""
    torch._dynamo.reset()
    reference, model = _fsdp_whole(copy.deepcopy(base)), _fsdp_whole(copy.deepcopy(base))
    compiled = graphopt.compile(model, memory_budget="1GB", accumulation_steps=2, compiler="eager")
    steps = []
    for step in (reference, compiled):
        for _ in range(2):
            loss = step(x)
            loss.backward()
        steps.append((loss.item(), [_local(p.grad).clone() for p in (reference if step is reference else model).parameters()]))
    (plan,) = graphopt.plans(compiled)
    return {
        "difference": _difference(*steps),
        "accumulated": plan.memory.get("accumulated gradients"),
        "shards": sum(_local(p).numel() * _local(p).element_size() for p in model.parameters()),
    }


def _measured_cases(rank: int, store: str, out: str, width: int, blocks: int, batch: int, budget: int) -> None:
    """DDP, whole-model and per-block FSDP2 under `budget` with Inductor: this rank's measured peak
    (the allocator's, as ``tests/compiled_step.py`` measures it) plus what the rank held
    before the step, against the same step without graphopt."""
    _init(rank, store)
    torch.manual_seed(0)
    base = Residual(width, blocks)
    x = torch.randn(batch, width, generator=torch.Generator().manual_seed(rank))
    results = {}
    for wrap_name in ("ddp", "fsdp", "fsdp-blocks"):
        torch._dynamo.reset()
        reference, model = WRAPS[wrap_name](copy.deepcopy(base)), WRAPS[wrap_name](copy.deepcopy(base))
        compiled = graphopt.compile(model, memory_budget=budget)
        parameters = list(model.parameters())
        # Two warm-up steps: the first compiles, and DDP rebuilds its buckets at the start
        # of the second (a new set allocated while the old one, made before the
        # measurement, is freed unseen by the allocator's record).
        for _ in range(2):
            _step(compiled, x, parameters)
            _step(reference, x, list(reference.parameters()))
        before = _held_before_step(model) + x.numel() * x.element_size()
        (loss, gradients), peak = _measured_step(compiled, x, parameters)
        expected, reference_peak = _measured_step(reference, x, list(reference.parameters()))
        plans = graphopt.plans(compiled)
        results[wrap_name] = {
            "measured": peak + before,
            "without graphopt": reference_peak + before,
            "predicted": max(plan.predicted_peak_bytes for plan in plans),
            "recomputed": sum(d.action == "recompute" for plan in plans for d in plan.decisions),
            "gradients match": all(torch.allclose(g, e, rtol=1e-4, atol=1e-5) for g, e in zip(gradients, expected[1]))
            and abs(loss - expected[0]) <= 1e-4 * abs(expected[0]),
        }
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def _held_before_step(model: nn.Module) -> int:
    """What the rank holds before a step whose gradients were set to None: parameters
    (FSDP2: shards), buffers and DDP's buckets (graphopt/distributed.py)."""
    held = graphopt.rank_memory(model)
    return held.parameters + held.buffers + held.gradient_buckets


def _measured_step(model: Callable, x: torch.Tensor, parameters: list[nn.Parameter]) -> tuple[tuple, int]:
    for parameter in parameters:
        parameter.grad = None
    result, peak = graphopt.measure_peak(lambda: _step(model, x, parameters), device="cpu", cpu_method="allocated")
    return result, peak.peak_bytes


class _Messages(logging.Handler):
    """Keeps graphopt's warnings."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _spawn(worker: Callable, tmp_path: Path, *args: object) -> list[dict]:
    """Run `worker(rank, store, out, *args)` on two gloo ranks; what each rank wrote."""
    mp.spawn(worker, args=(str(tmp_path / "store"), str(tmp_path), *args), nprocs=WORLD_SIZE, join=True)
    return [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]


# ----------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def gradient_cases(tmp_path_factory) -> list[dict]:
    return _spawn(_gradient_cases, tmp_path_factory.mktemp("distributed"), 256, 3, 1024)


CASES = [
    f"{wrap} {entry} {budget}"
    for wrap in WRAPS
    for budget in ("no budget", "budget")
    for entry in ("graphopt.compile", "torch.compile")
    if (wrap, entry, budget) not in {("ddp", "torch.compile", "budget"), ("fsdp-blocks", "torch.compile", "budget")}
]


@pytest.mark.parametrize("case", CASES)
def test_same_step_as_without_graphopt_on_every_rank(gradient_cases, case):
    for rank, results in enumerate(gradient_cases):
        assert results[case].get("difference") is None, f"rank {rank}: {results[case]}"


def test_ddp_is_one_graph_under_graphopt_compile(gradient_cases):
    for results in gradient_cases:
        assert results["ddp graphopt.compile no budget"]["graphs"] == 1
        assert results["ddp graphopt.compile budget"]["recomputed"] > 0


def test_whole_model_fsdp_under_a_budget_recomputes(gradient_cases):
    for results in gradient_cases:
        assert results["fsdp graphopt.compile budget"]["recomputed"] > 0


def test_fsdp_accumulation_counts_this_ranks_gradient_shards(gradient_cases):
    for results in gradient_cases:
        result = results["fsdp accumulation"]
        assert result["difference"] is None
        assert result["accumulated"] == result["shards"]


def test_optimizer_in_the_backward_is_refused_under_ddp_and_fsdp(gradient_cases):
    for results in gradient_cases:
        assert set(results["optimizer="]) == {f"{wrap} {entry}" for wrap in WRAPS for entry in ("graphopt.compile", "torch.compile")}
        for case, message in results["optimizer="].items():
            assert message is not None, f"{case}: a step ran with the update inside the backward"
            assert "call opt.step() after loss.backward()" in message, case


def test_torch_compile_under_a_budget_warns_that_rank_memory_is_not_counted(gradient_cases):
    """That path does not see the model: the shards, buckets and reserves need
    model_static_bytes; graphopt.compile reads them from the model."""
    for results in gradient_cases:
        assert results["fsdp torch.compile budget"]["warned of rank memory"]
        assert not results["fsdp graphopt.compile budget"]["warned of rank memory"]
        assert not results["fsdp torch.compile no budget"]["warned of rank memory"]


# 4 residual blocks of width 64 on 32768 rows: torch's min-cut keeps about 190 MB of
# activations per rank, against 0.5 MB of parameters; the budget makes graphopt recompute.
MEASURED_SHAPE = (64, 4, 32768)
MEASURED_BUDGET = 150_000_000


@pytest.fixture(scope="module")
def measured_cases(tmp_path_factory) -> list[dict]:
    return _spawn(_measured_cases, tmp_path_factory.mktemp("measured"), *MEASURED_SHAPE, MEASURED_BUDGET)


@pytest.mark.parametrize("wrap", ["ddp", "fsdp", "fsdp-blocks"])
def test_measured_peak_on_every_rank_within_the_budget(measured_cases, wrap):
    for rank, results in enumerate(measured_cases):
        result = results[wrap]
        assert result["gradients match"], f"rank {rank}: {result}"
        assert result["without graphopt"] - MEASURED_BUDGET > 30_000_000, f"rank {rank}: the budget binds: {result}"
        assert result["recomputed"] > 0
        assert result["measured"] <= MEASURED_BUDGET, f"rank {rank}: {result}"


def test_ddp_split_by_torch_compile_is_refused_under_a_budget(gradient_cases):
    """Dynamo splits DDP's graph at its 1 MB buckets here; graphopt does not plan the
    pieces jointly, so under a budget it refuses them and says to use graphopt.compile."""
    for results in gradient_cases:
        result = results["ddp torch.compile budget"]
        assert result["error"] == "GraphoptError"
        assert "graphopt.compile" in result["message"]


def test_per_block_fsdp_plans_the_block_graph_for_every_block(gradient_cases):
    """The blocks share one graph, run once per block before the first backward: its
    plan reserves what the earlier runs keep (docs/distributed.md)."""
    for results in gradient_cases:
        assert any(results["fsdp-blocks graphopt.compile budget"]["earlier runs"])


def test_per_block_fsdp_through_torch_compile_refuses_the_reused_block_graph(gradient_cases):
    """torch.compile(backend="graphopt") does not see the model, so it does not know the
    block graph runs once per block: it refuses the second run instead of exceeding the
    budget."""
    for results in gradient_cases:
        assert results["fsdp-blocks torch.compile budget"]["error"] == "RepeatedGraphError"


def test_rank_memory_of_a_plain_model_is_its_parameters_and_buffers_each_storage_once():
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 8))
    model[2].weight = model[0].weight  # tied: one storage
    held = graphopt.rank_memory(model)
    assert held.parameters == (8 * 8 + 8 + 8 + 8 + 8) * 4
    assert held.buffers == (8 + 8) * 4 + 8  # running mean and variance, num_batches_tracked (int64)
    assert held.total_bytes == held.parameters + held.buffers


# ----------------------------------------------------------------------------- graphopt plan --ddp

TINY_MODEL = '''
import torch
from torch import nn


def build(batch=64, width=32):
    model = nn.Sequential(*(nn.Linear(width, width) for _ in range(3)))
    return model, (torch.randn(batch, width),), lambda output: output.tanh().square().mean()
'''


def test_plan_ddp_counts_one_ranks_gradient_buckets(tmp_path, capsys):
    from graphopt.cli import main

    model_file = tmp_path / "tiny.py"
    model_file.write_text(TINY_MODEL)
    memory = {}
    for flags in ([], ["--ddp"]):
        out = tmp_path / f"plan{len(flags)}.json"
        assert main(["plan", str(model_file), "--hardware", "cpu", "--budget", "1MB", "--json", str(out), *flags]) == 0
        (plan,) = json.loads(out.read_text())["plans"]
        memory[bool(flags)] = plan["memory"]
    assert "DDP's gradient buckets (12.67 KB)" in capsys.readouterr().out
    # The buckets, as large as the trainable parameters, on a line of their own.
    assert memory[True]["DDP gradient buckets"] == 3 * (32 * 32 + 32) * 4
    assert "DDP gradient buckets" not in memory[False]
    assert memory[True]["other graphs"] == memory[False]["other graphs"]
