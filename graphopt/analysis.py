"""Analysis of a joint graph: candidates, sizes, lifetimes and costs as a plain ``Problem``.

The timeline is the forward's nodes in order, then the backward's. Memory that no
decision changes (parameters, inputs, forward temporaries, backward temporaries,
gradients) becomes ``base_bytes``; every forward tensor the backward reads, and every
forward tensor it could be recomputed from, becomes a ``Candidate``.

Modelling choices, each conservative or corrected later by simulating the real graphs:
- Inductor fuses pointwise chains, so a pointwise node whose users are all pointwise in
  the same pass is not counted as a temporary.
- A saved view (``unbind``'s q, k, v) holds the buffer it views: that buffer's bytes,
  once, however many of its views are saved.
- A recomputed tensor is recomputed just before the earliest backward use of itself or
  of a tensor recomputed from it, however many hops away (the problem derives that
  from the decisions), and lives to its last such use.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch.fx as fx

from . import torch_private
from .alternatives import AlternativePricer, AlternativeSettings, Lifetime
from .cost_models import HardwareProfile, OpCost, estimate_node_cost
from .cost_models.memory import allocated_by, allocated_bytes, is_materialized, storage_owner, value_bytes
from .problem import QUANTIZE, Candidate, Problem
from .torch_private import JointGraph

NodeCost = Callable[[fx.Node], OpCost]

_CANNOT_SAVE_POLICIES = {"MUST_RECOMPUTE"}
_CANNOT_RECOMPUTE_POLICIES = {"MUST_SAVE"}
# Policies that ask for the tensor as it is (saved whole, or recomputed): no alternatives.
_EXACT_POLICIES = {"MUST_SAVE", "MUST_RECOMPUTE"}
_OFFLOAD_POLICIES = {"MUST_CPU_OFFLOAD", "PREFER_CPU_OFFLOAD"}


@dataclasses.dataclass(frozen=True)
class Analysis:
    """A ``Problem`` plus what maps it back to the graph."""

    problem: Problem
    candidate_nodes: tuple[fx.Node, ...]
    static_bytes: int  # graph inputs alive for the whole step
    parameter_bytes: int
    gradient_bytes: int
    extra_static_bytes: int  # what other graphs keep alive during this one
    timeline_nodes: tuple[fx.Node, ...]
    static_input_nodes: tuple[fx.Node, ...]  # graph inputs: parameters, buffers, the batch
    host_is_device: bool = True  # planning for a CPU: an offloaded copy is in the same memory
    # What later graphs (after a graph break) need while this one's saved tensors wait
    # for its backward: held at the end of the forward (``Session.room_after``).
    room_after_forward: int = 0
    later_gradients: int = 0


def analyze(
    joint: JointGraph,
    hardware: HardwareProfile,
    *,
    budget_bytes: int | None,
    extra_static_bytes: int = 0,
    node_cost: NodeCost | None = None,
    alternatives: AlternativeSettings = AlternativeSettings(),
    error_weight_ms: float = 0.0,
    room_after_forward: int = 0,
    later_gradients: int = 0,
) -> Analysis:
    """`node_cost` prices an op (default: the hardware's roofline estimate);
    `alternatives` says which offload / quantize choices the program may make;
    `room_after_forward` is memory later graphs use between this graph's forward and
    its backward (counted at the forward's last step); `later_gradients` is memory
    later graphs' gradients hold through this graph's backward."""
    node_cost = node_cost or functools.partial(estimate_node_cost, hardware=hardware)
    timeline = joint.forward_nodes + joint.backward_nodes
    position = {node: step for step, node in enumerate(timeline)}
    num_forward = len(joint.forward_nodes)
    end = len(timeline) - 1

    static_bytes = sum(value_bytes(p.meta.get("val")) for p in joint.primals)
    gradient_bytes = sum(allocated_bytes(n) for n in {storage_owner(o) for o in joint.backward_outputs})

    uses = _uses_by_storage(timeline, position, num_forward)
    base = [0] * (len(timeline) + 1)  # changes per step, summed below
    forward_outputs = set(joint.forward_outputs)
    backward_outputs = set(joint.backward_outputs)
    free_at: dict[fx.Node, int] = {}
    primals = set(joint.primals)
    for node in joint.forward_nodes:
        if node in primals:  # graph inputs: static memory, counted once
            continue
        if node in joint.optional_forward_nodes:  # exists in the forward only if kept
            free_at[node] = position[node] - 1
            continue
        forward_uses = uses.forward.get(node, [])
        last = num_forward - 1 if node in forward_outputs else max(forward_uses, default=position[node])
        if _is_temporary(node, position, num_forward):
            _add(base, position[allocated_by(node)], last, allocated_bytes(node))
            free_at[node] = last
        else:
            free_at[node] = position[node] - 1
    for node in joint.backward_nodes:
        last = end if node in backward_outputs else max(uses.backward.get(node, []), default=position[node])
        if node in backward_outputs or _is_temporary(node, position, num_forward):
            _add(base, position[allocated_by(node)], last, allocated_bytes(node))
    for tangent in joint.tangents:
        _add(base, num_forward, max(uses.backward.get(tangent, []), default=num_forward), value_bytes(tangent.meta.get("val")))

    if room_after_forward:
        base[num_forward - 1] += room_after_forward
        base[num_forward] -= room_after_forward
    base[num_forward] += later_gradients
    base_bytes, running = [], static_bytes + extra_static_bytes
    for change in base[:-1]:
        running += change
        base_bytes.append(running)

    nodes = _candidate_nodes(joint, uses)
    index = {node: i for i, node in enumerate(nodes)}
    mutated = torch_private.mutated_inputs(joint)
    pricer = _pricer(nodes, timeline, num_forward, hardware, node_cost, alternatives)
    backward = frozenset(joint.backward_nodes)
    candidates = tuple(
        _with_alternatives(
            _candidate(node, index, uses, _own_reads(node, uses, num_forward), backward, free_at.get(node, position[node] - 1), hardware, node_cost, mutated),
            node,
            position[node],
            _first_need(node, index, uses, num_forward),
            pricer,
            alternatives,
        )
        for node in nodes
    )
    problem = Problem(candidates, tuple(base_bytes), num_forward, budget_bytes, error_weight_ms)
    return Analysis(
        problem,
        tuple(nodes),
        static_bytes,
        parameter_bytes(joint),
        gradient_bytes,
        extra_static_bytes,
        timeline,
        joint.primals,
        host_is_device=hardware.device_type == "cpu",
        room_after_forward=room_after_forward,
        later_gradients=later_gradients,
    )


def parameter_bytes(joint: JointGraph) -> int:
    """Bytes of the parameters and buffers the graph reads (its static-lifetime inputs)."""
    return sum(value_bytes(p.meta.get("val")) for p in joint.static_inputs)


@dataclasses.dataclass
class _Uses:
    forward: dict[fx.Node, list[int]]  # storage owner -> steps of forward users
    backward: dict[fx.Node, list[int]]  # storage owner -> steps of backward users


def _uses_by_storage(timeline: tuple[fx.Node, ...], position: dict, num_forward: int) -> _Uses:
    """Steps at which each storage is read, a view's readers counted for what it views."""
    uses = _Uses({}, {})
    for node in timeline:
        step = position[node]
        for source in node.all_input_nodes:
            owner = storage_owner(source)
            table = uses.forward if step < num_forward else uses.backward
            table.setdefault(owner, []).append(step)
            if owner is not source:  # the view itself is read too
                table.setdefault(source, []).append(step)
    return uses


def _is_temporary(node: fx.Node, position: dict[fx.Node, int], num_forward: int) -> bool:
    """Whether the node's output gets a buffer in its own pass (see ``is_materialized``)."""
    in_forward = position[node] < num_forward
    same_pass = [u for u in node.users if u in position and (position[u] < num_forward) == in_forward]
    return is_materialized(node, same_pass) if same_pass else allocated_bytes(node) > 0


def _add(changes: list[int], first: int, last: int, size: int) -> None:
    """Record `size` bytes alive from step `first` through step `last`."""
    changes[first] += size
    changes[last + 1] -= size


def _own_reads(node: fx.Node, uses: _Uses, num_forward: int) -> tuple[int, int]:
    """First and last backward step reading the candidate (or a view of it); a pure
    ancestor, read by no backward op, gets the first backward step (the problem ignores
    it: such a tensor is needed only when what is recomputed from it is)."""
    own = uses.backward.get(node, [])
    return (min(own), max(own)) if own else (num_forward, num_forward)


def _first_need(node: fx.Node, index: dict, uses: _Uses, num_forward: int) -> int:
    """The first backward step reading the candidate or a tensor recomputed straight
    from it: where an offloaded or quantized copy must be whole again, were its readers
    recomputed."""
    reads = [_own_reads(node, uses, num_forward)[0]]
    reads += [min(uses.backward[user]) for user in node.users if user in index and user in uses.backward]
    return min(reads)


def _candidate_nodes(joint: JointGraph, uses: _Uses) -> list[fx.Node]:
    """Forward tensors the backward reads, closed over the forward tensors they come from."""
    forward = set(joint.forward_nodes)
    needed = [n for n in joint.forward_nodes if n in uses.backward and n.op == "call_function"]
    chosen = set(needed)
    stack = list(needed)
    while stack:
        for source in stack.pop().all_input_nodes:
            if source in forward and source.op == "call_function" and source not in chosen:
                chosen.add(source)
                stack.append(source)
    return [n for n in joint.forward_nodes if n in chosen]


def _candidate(
    node: fx.Node,
    index: dict,
    uses: _Uses,
    reads: tuple[int, int],
    backward: frozenset[fx.Node],
    free_at: int,
    hardware: HardwareProfile,
    node_cost: NodeCost,
    mutated: frozenset[fx.Node],
) -> Candidate:
    own = uses.backward.get(node, [])
    first, last = reads
    # Who could read it in the backward: backward ops, and candidates recomputed there.
    backward_readers = [user for user in node.users if user in index or user in backward]
    policy = torch_private.checkpoint_policy(node)
    value = node.meta.get("val")
    is_tuple = isinstance(value, (list, tuple))
    is_view = torch_private.is_view(node)
    owner = storage_owner(node)
    return Candidate(
        name=node.name,
        size_bytes=allocated_bytes(node),
        recompute_ms=0.0 if is_view else _recompute_ms(node, hardware, node_cost),
        inputs=tuple(index[s] for s in node.all_input_nodes if s in index),
        free_at=free_at,
        backward_first_use=first,
        backward_last_use=last,
        needed_by_backward=bool(own),
        can_recompute=not (
            torch_private.is_random(node)
            or torch_private.must_stay_in_forward(node)
            or policy in _CANNOT_RECOMPUTE_POLICIES
            # the forward writes that input in place: the backward would read the new value
            or any(source in mutated for source in node.all_input_nodes)
        ),
        can_keep=not (is_tuple or is_view or policy in _CANNOT_SAVE_POLICIES),
        storage_of=index.get(owner) if owner is not node else None,
        recomputed_bytes=None if is_materialized(node, backward_readers) else 0,
    )


def _pricer(nodes, timeline, num_forward: int, hardware: HardwareProfile, node_cost: NodeCost, settings: AlternativeSettings):
    """Prices alternatives when any may exist. Offload needs each step's compute time
    (what a copy can hide behind); quantizing alone does not."""
    offload_asked = any(torch_private.checkpoint_policy(n) in _OFFLOAD_POLICIES for n in nodes)
    if not settings.quantize_bits and not settings.offload and not offload_asked:
        return None
    if settings.offload or offload_asked:
        step_ms = [node_cost(n).ms if n.op == "call_function" else 0.0 for n in timeline]
    else:
        step_ms = [0.0] * len(timeline)
    return AlternativePricer(hardware, step_ms, num_forward)


def _with_alternatives(
    candidate: Candidate, node: fx.Node, produced: int, first_need: int, pricer, settings: AlternativeSettings
) -> Candidate:
    """The candidate with the offload / quantize choices the options and its policy allow.

    Only whole tensors the backward reads qualify (not views, tuples, or what torch pins
    to the forward). ``MUST_CPU_OFFLOAD`` leaves offloading as the only choice;
    ``PREFER_CPU_OFFLOAD`` offers it even where it cannot pay (a CPU), for the program to
    weigh.
    """
    policy = torch_private.checkpoint_policy(node)
    if pricer is None or not candidate.needed_by_backward or policy in _EXACT_POLICIES:
        return candidate
    if torch_private.is_view(node) or torch_private.must_stay_in_forward(node) or candidate.size_bytes == 0:
        return candidate
    lifetime = Lifetime(produced, candidate.free_at, first_need, candidate.backward_last_use)
    offload = settings.offload or policy in _OFFLOAD_POLICIES
    asked = {"minimum_bytes": 0} if policy in _OFFLOAD_POLICIES else {}
    found = pricer.alternatives(node.meta.get("val"), lifetime, bits=settings.quantize_bits, offload=offload, **asked)
    if policy == "MUST_CPU_OFFLOAD":
        found = tuple(a for a in found if a.kind != QUANTIZE)
        if found:  # else too small to be worth a copy: kept or recomputed as usual
            return dataclasses.replace(candidate, alternatives=found, can_keep=False, can_recompute=False)
    return dataclasses.replace(candidate, alternatives=found)


def _recompute_ms(node: fx.Node, hardware: HardwareProfile, node_cost: NodeCost) -> float:
    """Time to redo the node in the backward, on the hardware's roofline.

    Pointwise work fuses into its consumer's kernel there, so it pays no launch, but it
    does pay its traffic: reading its inputs is not free (pointwise ops count no FLOPs,
    and pricing them at zero made plans recompute every pointwise chain and run slower).
    """
    cost = node_cost(node)
    if torch_private.is_fusible(node) and cost.ms > 0:
        return max(cost.ms - hardware.kernel_overhead_ms, 0.0)
    return cost.ms
