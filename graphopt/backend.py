"""The ``graphopt`` dynamo backend: each captured graph is compiled with graphopt's partitioner."""

from __future__ import annotations

import dataclasses
import functools
import logging
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx

from . import __version__, torch_private
from .budget import format_bytes
from .chunking import compile_with_chunking
from .config import Options, make_options
from .cost_models.memory import concrete_size
from .effects import ForwardWrites
from .errors import GraphoptError, RepeatedGraphError, ShapeAbovePlanError
from .ops.apply_update import GraphParameters, refuse_under_ddp
from .planner import GivenPlan, Session, partition
from .repeats import RunCounter
from .trainable import FrozenRowsGuard, GraphTrainable, graph_trainable

log = logging.getLogger("graphopt")

# torch.compile(backend="graphopt", options=d) calls the backend once per graph with the
# same dict `d`; graphs of one compiled model share a Session (and so one budget) by it.
# The registry holds each entry weakly and every graph compiled for it strongly, so an
# entry goes when Dynamo drops those graphs (``torch._dynamo.reset()``, or its cache
# evicting them; Dynamo, not the model, owns compiled graphs).
_SESSIONS_BY_OPTIONS: weakref.WeakValueDictionary[int, _OptionsEntry] = weakref.WeakValueDictionary()


class GraphoptBackend:
    """A dynamo backend bound to one Session (what ``graphopt.compile`` installs)."""

    def __init__(
        self,
        options: Options,
        parameters: dict[str, torch.nn.Parameter] | None = None,
        selection: dict[str, float] | None = None,
        room_after: dict[str, int] | None = None,
        graph_runs: RunCounter | None = None,
        writes: ForwardWrites | None = None,
    ):
        """`parameters` (the model's, by name) and `selection` (name -> fraction that
        trains, checked against the whole model) come from ``graphopt.compile``; without
        them parameter names are read from Dynamo's sources, graph by graph.
        `room_after` is what graphs must leave free for later ones (``Session``).
        `graph_runs(graph_module, example_inputs)` says how many times per step a graph
        may run before its first backward (``repeats.graph_runs``; 1 without it).
        `writes` collects what the graphs' forwards write in place, for a call
        ``graphopt.compile`` reruns (``effects.ForwardWrites``); replanned backends share it."""
        given = {graph: GivenPlan(dict(decisions), by_min_cut) for graph, by_min_cut, decisions in options.given}
        self.session = Session(options, given=given, room_after=dict(room_after or {}))
        self._graphs = 0
        self._parameters = parameters
        self._names_by_id = {id(p): (name, p) for name, p in (parameters or {}).items()}
        self._selection = selection
        self._frozen_rows = FrozenRowsGuard()  # its optimizer hook goes with this backend
        self._graph_runs = graph_runs
        self.writes = writes if writes is not None else ForwardWrites()

    def replanned(self, room_after: dict[str, int]) -> GraphoptBackend:
        """A fresh backend (Dynamo compiles again for it) whose graphs leave `room_after`."""
        return GraphoptBackend(
            self.session.options, self._parameters, self._selection, room_after, self._fresh_runs(), self.writes
        )

    def with_resident_gradients(self) -> GraphoptBackend:
        """A fresh backend whose plans count the parameters' gradients as alive from the
        step's start (gradient accumulation)."""
        options = dataclasses.replace(self.session.options, resident_gradients=True)
        return GraphoptBackend(
            options, self._parameters, self._selection, self.session.room_after, self._fresh_runs(), self.writes
        )

    def _fresh_runs(self) -> RunCounter | None:
        return self._graph_runs.fresh() if self._graph_runs is not None else None

    def __call__(self, graph_module: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        if torch_private.compiling_under_ddp():
            refuse_under_ddp(self.session.options.optimizer)
        if self.session.options.memory_budget_bytes is not None and torch_private.compiling_ddp_bucket_graph():
            raise GraphoptError(
                "torch.compile split this DDP model's graph at its gradient buckets (Dynamo's DDP optimization). "
                "graphopt plans such pieces one after another and does not count a later piece's gradients "
                "during an earlier piece's backward, so the budget would not hold (18% over on the model of "
                "docs/distributed.md). Use graphopt.compile(model, memory_budget=...), which compiles a DDP model "
                "as one graph, or turn Dynamo's optimize_ddp setting off around the calls."
            )
        graph_name = f"graph_{self._graphs}"
        self._graphs += 1
        trainable = self._graph_trainable(graph_module, example_inputs)
        graph_parameters = self._graph_parameters(graph_module, example_inputs)
        # Without a budget a plan is torch's min-cut whatever the runs, and no run is refused.
        budgeted = self.session.options.memory_budget_bytes is not None
        runs = self._graph_runs(graph_module, example_inputs) if budgeted and self._graph_runs is not None else 1
        partition_fn = functools.partial(
            partition, self.session, graph_name, trainable=trainable, graph_parameters=graph_parameters, runs=runs,
            at_graph_break=budgeted and torch_private.compiled_at_graph_break(graph_module),
        )

        def compile_graph(graph: fx.GraphModule) -> Callable:
            if self.session.options.compiler == "eager":
                return torch_private.compile_without_codegen(graph, example_inputs, partition_fn)
            uuid = f"graphopt-{__version__}-{self.session.options.cache_key()}-{graph_name}"
            return torch_private.compile_with_inductor(graph, example_inputs, partition_fn, uuid)

        # The head + loss in chunks when the budget needs it (chunking.py).
        compiled = compile_with_chunking(self.session, graph_name, graph_module, compile_graph)
        if self.session.options.memory_budget_bytes is None:
            return compiled
        written = torch_private.written_input_positions(len(example_inputs))
        self.writes.graph_writes(example_inputs[i] for i in written if isinstance(example_inputs[i], torch.Tensor))
        return _once_per_backward(compiled, graph_name, self.session, _planned_sizes(example_inputs), runs)

    def _graph_trainable(self, graph_module: fx.GraphModule, example_inputs: Sequence[Any]) -> GraphTrainable | None:
        """What each parameter input of this graph trains (None: all of them).

        Dynamo passes the parameters themselves as inputs, so identity names them.
        """
        spec = self.session.options.trainable
        if spec is None:
            return None
        if self._selection is not None:
            selection = self._selection
            names = [self._parameter_name(value) for value in example_inputs]
        else:
            names = torch_private.parameter_input_names(graph_module, example_inputs)
            selection, unmatched = spec.select([name for name in names if name is not None])
            if unmatched:
                log.warning("trainable=%s: %s matched no parameter of this graph", spec.text, ", ".join(map(repr, unmatched)))
        trainable = graph_trainable(selection, names, example_inputs)
        self._frozen_rows.add(example_inputs[index] for index, rows in trainable.rows.items() if rows > 0)
        return trainable

    def _graph_parameters(self, graph_module: fx.GraphModule, example_inputs: Sequence[Any]) -> GraphParameters | None:
        """With optimizer=, which inputs are the parameters it updates: Dynamo passes the
        real tensors as example inputs, so identity finds them."""
        if self.session.optimizer is None:
            return None
        return self.session.optimizer.graph_parameters(graph_module, example_inputs)

    def _parameter_name(self, value: Any) -> str | None:
        entry = self._names_by_id.get(id(value))
        return entry[0] if entry is not None and entry[1] is value else None


def _once_per_backward(
    compiled: Callable,
    graph_name: str,
    session: Session,
    planned: dict[int, int | tuple[int, ...]] | None = None,
    runs: int = 1,
) -> Callable:
    """`compiled`, refusing to run its forward again while the saved tensors of its
    previous run wait for their backward (`RepeatedGraphError`): the plan counted them
    once. A run's backward has come when the gradient of any of its outputs that require
    one arrives, or when all of those are freed without a backward.

    `planned` are the sizes a graph compiled for symbolic sizes was planned at (input
    position -> the value of a SymInt input, or a tensor input's shape): a call with any
    larger raises `ShapeAbovePlanError`, since its peak may exceed the budget. Smaller
    sizes fit: every tensor's bytes grow with the sizes.

    A graph planned for `runs` runs before its first backward (per-block FSDP2's block
    graph, `planner._plan_for_runs`) refuses only the run after those."""
    pending = 0

    def awaiting_backward(outputs: list[torch.Tensor]) -> None:
        nonlocal pending
        pending += 1
        session.pending[graph_name] = pending
        state = {"open": True, "alive": len(outputs)}

        def done() -> None:
            nonlocal pending
            if state["open"]:
                state["open"] = False
                pending -= 1
                session.pending[graph_name] = pending
                session.open_runs.discard(done)

        session.open_runs.add(done)

        def freed() -> None:
            state["alive"] -= 1
            if not state["alive"]:
                done()

        for output in outputs:
            output.register_hook(lambda gradient: done())
            weakref.finalize(output, freed)

    def run(*args: Any) -> Any:
        nonlocal pending
        recording = torch.is_grad_enabled()
        if recording and not session.options.resident_gradients and _has_gradients(args):
            raise GraphoptError(
                f"a parameter of {graph_name} has a .grad as its forward starts, alive through the step, and its plan "
                "counted no gradient before the backward. For gradient accumulation over k micro-batches pass "
                "accumulation_steps=k (graphopt.compile) or options={'accumulation_steps': k} (torch.compile); "
                "otherwise clear gradients with zero_grad(set_to_none=True) before each step."
            )
        if recording and planned:
            _check_planned_sizes(args, planned, graph_name)
        if recording and pending >= runs:
            saved = session.saved_bytes.get(graph_name, 0)
            raise RepeatedGraphError(
                f"{graph_name} ran its forward again before the backward of its previous run, so the "
                f"{format_bytes(saved)} it keeps for the backward would be held once more than its plan counts "
                f"(planned for {runs} run(s) before the first backward). graphopt.compile counts a block graph's "
                "runs from the modules of its class (a graph break inside the loop over blocks, per-block FSDP2); "
                "this graph's runs could not be counted that way: a function without parameters called in a loop "
                "with a graph break inside it, several forwards before one backward, or torch.compile("
                "backend='graphopt'), which does not see the model. Remove the graph break (an explicit "
                "graph_break(), a print, an unsupported call) so the loop compiles into one graph, call backward "
                "after each forward, or use graphopt.compile (docs/design.md, 'Graph breaks')."
            )
        if recording:
            session.forward_runs += 1
        outputs = compiled(*args)
        # Fake outputs come from a run at compile time (Dynamo's DDP graph splitting runs
        # each piece on fake tensors to trace the next): no backward follows it.
        real = [output for output in _tensors(outputs) if not torch_private.is_fake(output)]
        waiting = [output for output in real if output.requires_grad] if recording else []
        if waiting:
            awaiting_backward(waiting)
        return outputs

    return run


def _planned_sizes(example_inputs: Sequence[Any]) -> dict[int, int | tuple[int, ...]]:
    """The sizes a graph compiled for symbolic sizes is planned at: its SymInt inputs'
    values and its symbolically shaped tensors' shapes, as traced (their hints)."""
    planned: dict[int, int | tuple[int, ...]] = {}
    for position, value in enumerate(example_inputs):
        if isinstance(value, torch.SymInt):
            hint = concrete_size(value)
            if hint is not None:
                planned[position] = hint
        elif isinstance(value, torch.Tensor) and any(isinstance(size, torch.SymInt) for size in value.shape):
            sizes = tuple(concrete_size(size) for size in value.shape)
            if None not in sizes:
                planned[position] = sizes
    return planned


def _check_planned_sizes(args: Sequence[Any], planned: dict[int, int | tuple[int, ...]], graph_name: str) -> None:
    """Raise `ShapeAbovePlanError` when a call's sizes exceed those `graph_name` was planned at."""
    for position, sizes in planned.items():
        value = args[position] if position < len(args) else None
        if isinstance(sizes, int):
            over = isinstance(value, int) and value > sizes
            seen = value
        else:
            seen = tuple(value.shape) if isinstance(value, torch.Tensor) else None
            over = seen is not None and len(seen) == len(sizes) and any(a > b for a, b in zip(seen, sizes))
        if over:
            raise ShapeAbovePlanError(
                f"{graph_name} was compiled for symbolic sizes and planned at input {position} = {sizes}; this call "
                f"has {seen}, where its peak may exceed the memory budget. graphopt.compile plans again at the "
                "larger size when nothing of the step has run yet; otherwise call the model with its largest shape "
                "first (smaller shapes then fit the plan), or compile with dynamic=False so each shape is planned."
            )


def _has_gradients(inputs: Sequence[Any]) -> bool:
    """Whether a leaf input that requires grad (a parameter) holds a ``.grad``."""
    return any(
        isinstance(value, torch.Tensor) and value.requires_grad and value.is_leaf and value.grad is not None
        for value in inputs
    )


def _tensors(outputs: Any) -> list[torch.Tensor]:
    values = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    return [value for value in values if isinstance(value, torch.Tensor)]


@dataclasses.dataclass(eq=False)
class _OptionsEntry:
    """The backend made for one ``options`` dict. A dict cannot be weakly referenced, so
    the entry holds it: its id, the registry's key, stays unique while the entry lives."""

    options: dict
    backend: GraphoptBackend


def graphopt_backend(graph_module: fx.GraphModule, example_inputs: Sequence[Any], options: dict | None = None) -> Callable:
    """Entry point for ``torch.compile(model, backend="graphopt", options={...})``."""
    options = options if options is not None else {}
    entry = _SESSIONS_BY_OPTIONS.get(id(options))
    if entry is None:
        entry = _OptionsEntry(options, GraphoptBackend(make_options(options)))
        _SESSIONS_BY_OPTIONS[id(options)] = entry
        _warn_rank_memory_unknown(options)
    return _holding(entry.backend(graph_module, example_inputs), entry)


def _warn_rank_memory_unknown(options: dict) -> None:
    """Under a budget in a process group, say that what the rank holds outside the graphs
    is not counted unless given: this path does not see the model."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and options.get("memory_budget") is not None and "model_static_bytes" not in options:
        log.warning(
            "torch.compile(backend='graphopt') does not see the model, so the budget does not count what this rank "
            "holds outside the compiled graphs (DDP's gradient buckets; FSDP2's parameter and gradient shards and "
            "its reduce-scatter copy). Pass options={'model_static_bytes': graphopt.rank_memory(model).total_bytes, "
            "...}, or use graphopt.compile (docs/distributed.md)."
        )


def _holding(compiled: Callable, owner: object) -> Callable:
    """`compiled`, keeping `owner` alive for as long as Dynamo keeps the compiled graph."""

    def run(*args: Any) -> Any:
        return compiled(*args)

    run.graphopt_owner = owner  # type: ignore[attr-defined]
    return run


def session_for_options(options: dict) -> Session | None:
    """The Session of the graphs compiled for `options`, while any of them lives."""
    entry = _SESSIONS_BY_OPTIONS.get(id(options))
    return entry.backend.session if entry is not None else None
