"""How many times per step one compiled graph runs before its first backward.

Dynamo compiles a module's forward code once and, with the module's parameters as graph
inputs, calls that one graph for every module of its class. A graph break inside a loop
over blocks (an explicit ``graph_break()``, a print, a call Dynamo cannot trace) gives
one graph per block *class*, run once per block: every run keeps its saved tensors until
the backward reaches it, so its plan must count them once per run
(``planner._plan_for_runs``). A graph knows only its example inputs, so the runs are
counted from the model, when the graph is compiled:

- the graph's *owner* is the innermost module holding every parameter among its inputs;
- it runs once per module of the owner's class whose parameters have the owner's
  shapes and dtypes (its *peers*), less the peers whose parameters an earlier graph of
  the step took as inputs (those run in that graph, not this one);
- a graph whose owner is the model itself, or with no parameter input, runs once, and
  so does a graph fed an activation that needs no gradient where its output needs one
  (the first block of a stack, fed the batch: the next blocks' inputs need one, and
  Dynamo compiles another graph for them).

The count is an upper bound where a peer is called elsewhere than through this graph:
a plan that reserves for a run that never comes only holds back memory. A graph that
runs more often than counted (a function without parameters called in a loop) is
refused at its extra run by ``backend._once_per_backward`` (``RepeatedGraphError``),
never planned as if it ran once. Under FSDP2 the units decide (``distributed.graph_runs``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
import torch.fx as fx

from .cost_models.memory import concrete_size
from .distributed import fsdp_units
from .distributed import graph_runs as fsdp_graph_runs


class RunCounter(Protocol):
    """How many times per step a graph runs before its first backward."""

    def __call__(self, graph_module: fx.GraphModule, example_inputs: Sequence[object]) -> int: ...

    def fresh(self) -> RunCounter:
        """A counter for graphs compiled again from scratch (a replanned step)."""
        ...


def graph_runs(model: object) -> RunCounter | None:
    """The run counter for the graphs Dynamo compiles for `model`, or None when every
    graph runs once (a model that is not a module)."""
    if not isinstance(model, torch.nn.Module):
        return None
    if fsdp_units(model):  # one unit (the whole model): every graph runs once
        by_units = fsdp_graph_runs(model)
        return _ByInputs(by_units) if by_units is not None else None
    return _ModuleRuns(model)


class _ByInputs:
    """A stateless count from the example inputs alone (per-block FSDP2's units)."""

    def __init__(self, runs: Callable[[Sequence[object]], int]):
        self._runs = runs

    def __call__(self, graph_module: fx.GraphModule, example_inputs: Sequence[object]) -> int:
        return self._runs(example_inputs)

    def fresh(self) -> _ByInputs:
        return self


class _ModuleRuns:
    """Counts runs from the model's module tree (module docstring), remembering which
    parameters earlier graphs took."""

    def __init__(self, model: torch.nn.Module):
        self._model = model
        self._taken: set[int] = set()  # ids of parameters earlier graphs took as inputs

    def fresh(self) -> _ModuleRuns:
        return _ModuleRuns(self._model)

    def __call__(self, graph_module: fx.GraphModule, example_inputs: Sequence[object]) -> int:
        inputs = {id(value) for value in example_inputs if isinstance(value, torch.nn.Parameter)}
        if not inputs:
            return 1
        owners: dict[int, str] = {}  # a shared parameter belongs to its first module
        for path, module in self._model.named_modules():
            for parameter in module.parameters(recurse=False):
                owners.setdefault(id(parameter), path)
        paths = [owners[i].split(".") if owners[i] else [] for i in inputs if i in owners]
        owner_path = _common_prefix(paths) if len(paths) == len(inputs) else []
        taken, self._taken = self._taken, self._taken | inputs
        if not owner_path or _first_of_a_chain(graph_module, example_inputs):
            return 1
        owner = self._model.get_submodule(".".join(owner_path))
        signature = _signature(owner)
        peers = [
            module
            for module in self._model.modules()
            if type(module) is type(owner) and _signature(module) == signature
        ]
        return max(sum(1 for peer in peers if peer is owner or not _took_any(peer, taken)), 1)


def _first_of_a_chain(graph_module: fx.GraphModule, example_inputs: Sequence[object]) -> bool:
    """Whether a graph with trained parameters is the first block of a chain fed an
    activation that needs no gradient (the batch itself): an input that needs none, of
    the shape of an output that needs one. The next block takes that output, and Dynamo
    compiles another graph for it (its guards check ``requires_grad``), so this graph runs
    once per step. Inputs every block shares (rotary tables, masks) keep their shapes
    apart from the blocks' outputs."""
    if not any(isinstance(v, torch.nn.Parameter) and v.requires_grad for v in example_inputs):
        return False
    handed_on = {_shape(value) for value in _output_values(graph_module) if value.requires_grad}
    return any(
        isinstance(value, torch.Tensor)
        and not isinstance(value, torch.nn.Parameter)
        and value.is_floating_point()
        and not value.requires_grad
        and _shape(value) in handed_on
        for value in example_inputs
    )


def _output_values(graph_module: fx.GraphModule) -> list[torch.Tensor]:
    (output,) = graph_module.graph.find_nodes(op="output")
    values = []
    for node in output.all_input_nodes:
        value = node.meta.get("example_value")
        if isinstance(value, torch.Tensor):
            values.append(value)
    return values


def _shape(tensor: torch.Tensor) -> tuple:
    return tuple(concrete_size(size) for size in tensor.shape)


def _common_prefix(paths: list[list[str]]) -> list[str]:
    prefix = paths[0]
    for path in paths[1:]:
        length = 0
        while length < min(len(prefix), len(path)) and prefix[length] == path[length]:
            length += 1
        prefix = prefix[:length]
    return prefix


def _signature(module: torch.nn.Module) -> tuple:
    return tuple((name, tuple(p.shape), p.dtype) for name, p in module.named_parameters())


def _took_any(module: torch.nn.Module, taken: set[int]) -> bool:
    return any(id(parameter) in taken for parameter in module.parameters())
