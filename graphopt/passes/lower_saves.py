"""Lower the plan's offload and quantize decisions into a copy of the joint graph.

For each such tensor ``x`` the forward side gets what makes the saved form (quantize
right after ``x``; ``graphopt.offload`` right after it and ``graphopt.wait`` after
``x``'s last forward read), the backward side gets what restores ``x`` (prefetch and
wait, dequantize), and every backward read of ``x`` reads the restored tensor instead.
A tensor the plan recomputes from ``x`` is recomputed from the restored tensor: its
recomputation is cloned onto the backward side (and so on, transitively). The saved set
then holds the saved forms instead of ``x``; ``torch_private.split_joint_graph`` does
the rest. This pass only applies the plan's actions; it decides nothing.

Inserted nodes are pinned to their side of the split (``torch_private.pin_to``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import networkx as nx
import torch
import torch.fx as fx

from .. import torch_private
from ..cost_models.memory import HOST_MEMORY
from ..problem import DROP, KEEP, OFFLOAD, OFFLOAD_QUANTIZED, QUANTIZE, RECOMPUTE, parse_action
from ..ops import offload as offload_ops
from ..ops.quantize import dequantize, quantize


@dataclasses.dataclass(frozen=True)
class LoweredSaves:
    module: fx.GraphModule  # a copy of the joint graph, rewritten
    saved: list[fx.Node]  # the saved set, in the copy
    lowered: int  # tensors now offloaded or quantized


def lower_saves(
    joint: torch_private.JointGraph,
    saved: Sequence[fx.Node],
    candidates: Sequence[fx.Node],
    actions: Sequence[str],
    *,
    host_is_device: bool,
) -> LoweredSaves:
    """`saved` and `candidates` are nodes of ``joint.module``; the result refers to the copy.

    Unless `host_is_device` (a CPU plan), offloaded copies are marked as host memory so
    the simulation of the split graphs does not count them against the device.
    """
    module, copy_of = torch_private.copy_graph_module(joint.module)
    graph = module.graph
    backward = [copy_of[n] for n in joint.backward_nodes]
    new_saved = [copy_of[n] for n in saved]
    restored: dict[fx.Node, fx.Node] = {}
    for node, action in zip(candidates, actions):
        if action in (KEEP, RECOMPUTE, DROP):
            continue
        kind, bits = parse_action(action)
        x = copy_of[node]
        forms, restore = _save(graph, x, kind, bits, set(backward))
        if kind != QUANTIZE and not host_is_device:
            forms[0].meta[HOST_MEMORY] = True  # the offloaded copy (the wait aliases it)
            forms[0].args[0].meta[HOST_MEMORY] = True
        new_saved += forms
        restored[x] = restore
    if restored:
        recomputed = [copy_of[n] for n, a in zip(candidates, actions) if a == RECOMPUTE]
        _clone_recomputations(graph, recomputed, restored)
        for reader in backward:
            reader.args, reader.kwargs = _redirect((reader.args, reader.kwargs), restored)
        _sort_topologically(graph)
        module.recompile()
    return LoweredSaves(module, new_saved, len(restored))


def _save(graph: fx.Graph, x: fx.Node, kind: str, bits: int | str | None, backward: set[fx.Node]) -> tuple[list[fx.Node], fx.Node]:
    """The saved nodes for `x` and the node that restores it on the backward side.

    The restoring nodes are inserted right after the saved forms (a valid order); the
    split and torch's backward reordering move them next to their first use.
    """
    value = x.meta["val"]
    forward = torch_private.NodeEmitter(graph, insert_before=x.next, side="forward")
    if kind == OFFLOAD:
        host = _offload(graph, forward, x, backward)
        restore = torch_private.NodeEmitter(graph, insert_before=host.next, side="backward")
        return [host], _prefetch(restore, host, value.device)
    codes, scales = quantize(x, bits, value.numel(), forward)
    if kind == QUANTIZE:
        restore = torch_private.NodeEmitter(graph, insert_before=codes.next, side="backward")
        return [codes, scales], dequantize(codes, scales, bits, list(value.shape), value.dtype, restore)
    assert kind == OFFLOAD_QUANTIZED, kind
    host = _offload(graph, forward, codes, backward)
    restore = torch_private.NodeEmitter(graph, insert_before=host.next, side="backward")
    back = _prefetch(restore, host, value.device)
    return [host, scales], dequantize(back, scales, bits, list(value.shape), value.dtype, restore)


def _offload(graph: fx.Graph, forward: torch_private.NodeEmitter, x: fx.Node, backward: set[fx.Node]) -> fx.Node:
    """Start the copy right after `x`; wait for it after x's last forward read."""
    host = forward(offload_ops.OFFLOAD, x)
    order = _order(graph)
    forward_readers = [u for u in x.users if u not in backward and not torch_private.is_pinned_to_backward(u)]
    last_reader = max([host, *forward_readers], key=order)
    waiter = torch_private.NodeEmitter(graph, insert_before=last_reader.next, side="forward")
    return waiter(offload_ops.WAIT, host, x)


def _prefetch(restore: torch_private.NodeEmitter, host: fx.Node, device: torch.device) -> fx.Node:
    back = restore(offload_ops.PREFETCH, host, device)
    return restore(offload_ops.WAIT, back, host)


def _clone_recomputations(graph: fx.Graph, recomputed: list[fx.Node], restored: dict[fx.Node, fx.Node]) -> None:
    """Recompute on the backward side, from restored tensors, what reads an offloaded or
    quantized tensor (in forward order, so clones read earlier clones)."""
    for node in sorted(recomputed, key=_order(graph)):
        if not any(source in restored for source in node.all_input_nodes):
            continue
        sources = [restored.get(source, source) for source in node.all_input_nodes]
        with graph.inserting_after(max(sources, key=_order(graph))):
            clone = graph.node_copy(node, lambda source: restored.get(source, source))
        torch_private.pin_to(clone, "backward")
        restored[node] = clone


def _sort_topologically(graph: fx.Graph) -> None:
    """Move nodes so each comes after its inputs, otherwise keeping the graph's order.

    A backward-only reader can sit in the forward's part of the joint graph (an ``alias``
    of a saved norm statistic), before the restored tensor it now reads.
    """
    position = {node: index for index, node in enumerate(graph.nodes)}
    dependencies = nx.DiGraph()
    dependencies.add_nodes_from(position)
    dependencies.add_edges_from((source, node) for node in position for source in node.all_input_nodes)
    # Of the nodes whose inputs have run, always the earliest in the graph's order.
    order = list(nx.lexicographical_topological_sort(dependencies, key=position.__getitem__))
    for previous, node in zip(order, order[1:]):
        if previous.next is not node:
            previous.append(node)


def _redirect(arguments: object, restored: dict[fx.Node, fx.Node]) -> object:
    return fx.node.map_arg(arguments, lambda source: restored.get(source, source))


def _order(graph: fx.Graph):
    position = {node: index for index, node in enumerate(graph.nodes)}
    return lambda node: position.get(node, math.inf)
