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
  so does a graph fed an activation that needs no gradient (the first block of a
  stack, fed the batch: the next blocks' inputs need one, and Dynamo compiles another
  graph for them).

The count is an upper bound where a peer is called elsewhere than through this graph:
a plan that reserves for a run that never comes only holds back memory. A graph that
runs more often than counted (a function without parameters called in a loop) is
refused at its extra run by ``backend._once_per_backward`` (``RepeatedGraphError``),
never planned as if it ran once. Under FSDP2 the units decide (``distributed.graph_runs``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .distributed import fsdp_units
from .distributed import graph_runs as fsdp_graph_runs


def graph_runs(model: object) -> Callable[[Sequence[object]], int] | None:
    """`runs(example_inputs)` for the graphs Dynamo compiles for `model`, or None when
    every graph runs once (a model that is not a module)."""
    if not isinstance(model, torch.nn.Module):
        return None
    if fsdp_units(model):
        return fsdp_graph_runs(model)
    return _ModuleRuns(model)


class _ModuleRuns:
    """Counts runs from the model's module tree (module docstring), remembering which
    parameters earlier graphs took."""

    def __init__(self, model: torch.nn.Module):
        self._model = model
        self._taken: set[int] = set()  # ids of parameters earlier graphs took as inputs

    def __call__(self, example_inputs: Sequence[object]) -> int:
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
        if not owner_path or _first_of_a_chain(example_inputs):
            return 1
        owner = self._model.get_submodule(".".join(owner_path))
        signature = _signature(owner)
        peers = [
            module
            for module in self._model.modules()
            if type(module) is type(owner) and _signature(module) == signature
        ]
        return max(sum(1 for peer in peers if peer is owner or not _took_any(peer, taken)), 1)


def _first_of_a_chain(example_inputs: Sequence[object]) -> bool:
    """Whether a graph with trained parameters takes an activation that needs no
    gradient: the first block of a stack, fed the batch itself. Each later block takes
    the previous one's output, which needs a gradient, and Dynamo compiles another graph
    for it (its guards check ``requires_grad``), so this graph runs once per step."""
    trained = any(isinstance(v, torch.nn.Parameter) and v.requires_grad for v in example_inputs)
    return trained and any(
        isinstance(value, torch.Tensor)
        and not isinstance(value, torch.nn.Parameter)
        and value.is_floating_point()
        and not value.requires_grad
        for value in example_inputs
    )


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
