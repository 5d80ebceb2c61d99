"""Memory-aware topological reordering of one forward or backward graph.

The split graphs arrive in the joint graph's order (the backward in the order torch's
partitioner gives it to mimic the autograd engine). Another valid order can free big
temporaries sooner: with independent branches, finishing one branch, whose temporaries
then die, before starting the next keeps one branch's temporaries alive instead of all.

`reorder_graph` schedules the graph's compute nodes with several list schedulers and
keeps the order whose simulated peak is lowest (`cost_models.memory.graph_timeline`,
the simulation the planner judges plans with); the original order wins ties, so the
pass never raises the simulated peak. The schedulers:

- ``lpmf``, ``bfs``, ``dfs``: Inductor's ``reorder_for_peak_memory`` heuristics
  (``torch/_inductor/memory.py``), here on FX nodes: least-peak-memory-first,
  oldest-predecessors-first, and a depth-first walk visiting small nodes first. They are
  what Inductor's scheduler would try, so they stand for "Inductor's own order".
- ``lookahead``: graphopt's own, least-peak-memory-first with one step of lookahead:
  a node is also credited with what the best node it alone unblocks would free (an
  expansion whose reduction frees it right after is worth starting).

Constraints every order keeps: placeholders first, output last, a multi-output node's
``getitem``s right after it; side-effecting and random nodes in their original
relative order; nothing moves across an RNG-state op, an in-place write or one of
graphopt's own ops (offload, prefetch and wait, placed by the planner): the graph is cut
into segments there and each segment is ordered on its own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import networkx as nx
import torch.fx as fx

from .. import torch_private
from ..cost_models.memory import (
    allocated_bytes,
    graph_timeline,
    is_getitem,
    is_materialized,
    storage_owners,
    value_bytes,
)

ORIGINAL = "original"
GRAPHOPT_OPS = "graphopt"  # the torch.library namespace of graphopt's own ops
METHODS = ("lpmf", "bfs", "dfs", "lookahead")


@dataclasses.dataclass(frozen=True)
class ReorderResult:
    """What `reorder_graph` did: the order it kept and the simulated peaks around it."""

    method: str  # ORIGINAL when no scheduler beat the given order
    peak_before_bytes: int  # simulated peak of the graph's own memory, given order
    peak_after_bytes: int  # the same, kept order (never higher)
    peaks_bytes: dict[str, int]  # every scheduler's simulated peak, for the report

    @property
    def reordered(self) -> bool:
        return self.method != ORIGINAL


@dataclasses.dataclass
class _Units:
    """The graph as schedulable units (a node and its getitems) with their memory effects."""

    nodes: list[list[fx.Node]]  # per unit, in the order its nodes must run
    unit_of: dict[fx.Node, int]
    predecessors: list[set[int]]
    successors: list[set[int]]
    segment: list[int]  # units run segment by segment: barriers cut the graph
    allocated: list[int]  # bytes the unit's outputs allocate
    reads: list[set[fx.Node]]  # buffers (storage owners) of other units the unit reads
    buffer_bytes: dict[fx.Node, int]
    readers: dict[fx.Node, set[int]]  # units reading each buffer
    pinned: set[fx.Node]  # buffers that live to the end (graph outputs)
    live_at_start: int  # owned inputs read by some unit


def reorder_graph(graph_module: fx.GraphModule, input_storage: dict[str, object] | None = None) -> ReorderResult:
    """Reorder `graph_module`'s nodes in place for the lowest simulated peak.

    `input_storage` is `graph_timeline`'s: the inputs the graph owns (the backward's
    saved tensors), keyed by storage. Returns what was tried and what was kept.
    """
    graph = graph_module.graph
    original = list(graph.nodes)
    before = max(graph_timeline(graph_module, input_storage), default=0)
    units = _build_units(original, input_storage or {})
    fixed_head = [n for n in original if n.op in ("placeholder", "get_attr")]
    output = [n for n in original if n.op == "output"]
    best_method, best_peak, peaks = ORIGINAL, before, {ORIGINAL: before}
    simulated = {tuple(original): before}  # schedulers often agree: simulate each order once
    for method in METHODS:
        schedule = SCHEDULERS[method](units)
        order = tuple(fixed_head + [node for unit in schedule for node in units.nodes[unit]] + output)
        if order not in simulated:
            _apply(graph, order)
            simulated[order] = max(graph_timeline(graph_module, input_storage), default=0)
        peaks[method] = simulated[order]
        if peaks[method] < best_peak:
            best_method, best_peak, best_order = method, peaks[method], order
    _apply(graph, original if best_method == ORIGINAL else best_order)
    graph.lint()
    graph_module.recompile()
    return ReorderResult(best_method, before, best_peak, peaks)


def _apply(graph: fx.Graph, order: Sequence[fx.Node]) -> None:
    """Move the graph's nodes into `order` (every node exactly once)."""
    previous = order[0]
    for node in order[1:]:
        if previous.next is not node:
            previous.append(node)
        previous = node


# ----------------------------------------------------------------------------- units


def _build_units(nodes: list[fx.Node], input_storage: dict[str, object]) -> _Units:
    compute = [n for n in nodes if n.op not in ("placeholder", "get_attr", "output")]
    unit_of: dict[fx.Node, int] = {}
    members: list[list[fx.Node]] = []
    for node in compute:
        producer = node.args[0] if is_getitem(node) and isinstance(node.args[0], fx.Node) else None
        if producer is not None and producer in unit_of:
            unit_of[node] = unit_of[producer]
            members[unit_of[node]].append(node)
        else:
            unit_of[node] = len(members)
            members.append([node])

    owner, _ = storage_owners(nodes, input_storage)
    sizes = _buffer_sizes(nodes, input_storage, owner)
    count = len(members)
    predecessors: list[set[int]] = [set() for _ in range(count)]
    reads: list[set[fx.Node]] = [set() for _ in range(count)]
    readers: dict[fx.Node, set[int]] = {buffer: set() for buffer in sizes}
    for index, unit in enumerate(members):
        for node in unit:
            for source in node.all_input_nodes:
                if source in unit_of and unit_of[source] != index:
                    predecessors[index].add(unit_of[source])
                buffer = owner(source)
                if buffer in sizes and unit_of.get(buffer) != index:
                    reads[index].add(buffer)
                    readers[buffer].add(index)
    _chain_pinned(members, predecessors)
    successors: list[set[int]] = [set() for _ in range(count)]
    for index, sources in enumerate(predecessors):
        for source in sources:
            successors[source].add(index)
    pinned = {owner(source) for n in nodes if n.op == "output" for source in n.all_input_nodes}
    allocated = [sum(sizes.get(node, 0) for node in unit) for unit in members]
    live_at_start = sum(size for buffer, size in sizes.items() if buffer.op == "placeholder" and readers[buffer])
    return _Units(
        members, unit_of, predecessors, successors, _segments(members), allocated, reads, sizes, readers, pinned, live_at_start
    )


def _buffer_sizes(nodes: list[fx.Node], input_storage: dict[str, object], owner) -> dict[fx.Node, int]:
    """Bytes of every buffer the graph owns: owned inputs and materialized outputs."""
    sizes = {}
    for node in nodes:
        if node.op == "placeholder" and node.name in input_storage and owner(node) is node:
            size = value_bytes(node.meta.get("val"))
        elif node.op == "call_function" and is_materialized(node, list(node.users)):
            size = allocated_bytes(node)
        else:
            continue
        if size:
            sizes[node] = size
    return sizes


def _chain_pinned(members: list[list[fx.Node]], predecessors: list[set[int]]) -> None:
    """Side-effecting and random units depend on the previous one: their order stays."""
    previous = None
    for index, unit in enumerate(members):
        if any(torch_private.keeps_relative_order(node) for node in unit):
            if previous is not None:
                predecessors[index].add(previous)
            previous = index


def _is_barrier(node: fx.Node) -> bool:
    """RNG-state ops and in-place writes (torch_private.is_order_barrier), and graphopt's
    own ops (offload, prefetch, wait, in-backward updates): the planner placed those,
    a prefetch early enough to hide its copy, and moving them would undo that."""
    return torch_private.is_order_barrier(node) or getattr(node.target, "namespace", None) == GRAPHOPT_OPS


def _segments(members: list[list[fx.Node]]) -> list[int]:
    """A segment number per unit: each barrier is a segment of its own between the
    units before it and the units after it."""
    segment, numbers = 0, []
    for unit in members:
        if any(_is_barrier(node) for node in unit):
            segment += 1
            numbers.append(segment)
            segment += 1
        else:
            numbers.append(segment)
    return numbers


# ----------------------------------------------------------------------------- schedulers


class _MemoryState:
    """Live bytes and, per unit, what running it now would free (Inductor's bookkeeping)."""

    def __init__(self, units: _Units):
        self.units = units
        self.remaining = {buffer: len(readers) for buffer, readers in units.readers.items()}
        self.frees = [0] * len(units.nodes)
        for buffer, readers in units.readers.items():
            if buffer in units.pinned:
                continue
            if len(readers) == 1:
                self.frees[next(iter(readers))] += units.buffer_bytes[buffer]
            elif not readers and buffer.op != "placeholder":  # an unread output dies at once
                self.frees[units.unit_of[buffer]] += units.buffer_bytes[buffer]
        self.live = units.live_at_start
        self.peak = self.live
        self.position: dict[int, int] = {}  # units run so far, by when they ran

    def run(self, unit: int) -> None:
        self.live += self.units.allocated[unit]
        self.peak = max(self.peak, self.live)
        self.live -= self.frees[unit]
        self.position[unit] = len(self.position)
        for buffer in self.units.reads[unit]:
            self.remaining[buffer] -= 1
            if self.remaining[buffer] == 1 and buffer not in self.units.pinned:
                (last,) = (r for r in self.units.readers[buffer] if r not in self.position)
                self.frees[last] += self.units.buffer_bytes[buffer]

    def net(self, unit: int) -> int:
        return self.units.allocated[unit] - self.frees[unit]


def _list_schedule(units: _Units, priority: Callable[[_MemoryState, int], tuple]) -> list[int]:
    """Run units one at a time, segment by segment, always the ready unit of the current
    segment with the least `priority(state, unit)`."""
    state = _MemoryState(units)
    waiting = [len(p) for p in units.predecessors]
    ready = [u for u, count in enumerate(waiting) if count == 0]
    order: list[int] = []
    for segment in sorted(set(units.segment)):
        while True:
            candidates = [u for u in ready if units.segment[u] == segment]
            if not candidates:
                break
            chosen = min(candidates, key=lambda u: priority(state, u))
            ready.remove(chosen)
            order.append(chosen)
            state.run(chosen)
            for successor in units.successors[chosen]:
                waiting[successor] -= 1
                if waiting[successor] == 0:
                    ready.append(successor)
    if len(order) != len(units.nodes):
        raise AssertionError("reorder: the unit graph has a cycle or a unit depends on a later segment")
    return order


def _lpmf_priority(state: _MemoryState, unit: int) -> tuple:
    """Inductor's least-peak-memory-first: a unit that fits under the peak so far, then
    the least net allocation, then the original position."""
    gap = state.peak - state.live
    allocated = state.units.allocated[unit]
    return (allocated if allocated > gap else 0, state.net(unit), unit)


def _lookahead_priority(state: _MemoryState, unit: int) -> tuple:
    """Least-peak-memory-first, with the unit credited for the best net effect of a unit
    it alone unblocks (its own reads and outputs released first)."""
    gap = state.peak - state.live
    allocated = state.units.allocated[unit]
    follow = min((_net_after(state, unit, successor) for successor in _unblocked(state, unit)), default=0)
    return (allocated if allocated > gap else 0, state.net(unit) + min(follow, 0), unit)


def _unblocked(state: _MemoryState, unit: int) -> list[int]:
    units = state.units
    return [
        successor
        for successor in units.successors[unit]
        if units.segment[successor] == units.segment[unit]
        and all(p in state.position or p == unit for p in units.predecessors[successor])
    ]


def _net_after(state: _MemoryState, unit: int, successor: int) -> int:
    """`successor`'s net allocation if it ran right after `unit`."""
    units = state.units
    frees = state.frees[successor]
    for buffer in units.reads[successor]:
        if buffer in units.pinned:
            continue
        if state.remaining[buffer] == 2 and unit in units.readers[buffer]:  # `unit` leaves `successor` the last reader
            frees += units.buffer_bytes[buffer]
    return units.allocated[successor] - frees


def _bfs_priority(state: _MemoryState, unit: int) -> tuple:
    """Inductor's BFS: the ready unit whose predecessors ran earliest first (FIFO keeps
    lifetimes short)."""
    return (sorted(state.position[p] for p in state.units.predecessors[unit]), unit)


def _dfs(units: _Units) -> list[int]:
    """Inductor's DFS: visit units by the bytes they write and read, smallest first,
    each after its predecessors (visited the same way), segment by segment."""
    weight = [
        units.allocated[u] + sum(units.buffer_bytes[b] for b in units.reads[u]) for u in range(len(units.nodes))
    ]

    def smallest_first(members):
        return sorted(members, key=lambda u: (weight[u], u))

    # Edges from each unit to its predecessors, smallest first: networkx walks a node's
    # edges, and the graph's nodes as roots, in the order they were added.
    dependencies = nx.DiGraph()
    for segment in sorted(set(units.segment)):
        dependencies.add_nodes_from(smallest_first(u for u in range(len(units.nodes)) if units.segment[u] == segment))
    for unit in range(len(units.nodes)):
        dependencies.add_edges_from((unit, predecessor) for predecessor in smallest_first(units.predecessors[unit]))
    return list(nx.dfs_postorder_nodes(dependencies))


SCHEDULERS: dict[str, Callable[[_Units], list[int]]] = {
    "lpmf": lambda units: _list_schedule(units, _lpmf_priority),
    "bfs": lambda units: _list_schedule(units, _bfs_priority),
    "dfs": _dfs,
    "lookahead": lambda units: _list_schedule(units, _lookahead_priority),
}
