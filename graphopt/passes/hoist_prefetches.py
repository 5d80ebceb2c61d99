"""Start each prefetch early enough that the compute before its use hides the copy.

``lower_saves`` leaves a prefetch of an offloaded tensor (graphopt/ops/offload.py) right
before its ``wait``, which would expose the whole host-to-device copy; this pass moves it
up the split backward graph, as far as the cost model assumed when it priced the offload.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch.fx as fx

from ..cost_models.memory import value_bytes
from ..ops.offload import PREFETCH, WAIT


def hoist_prefetches(
    backward: fx.GraphModule,
    node_ms: Callable[[fx.Node], float],
    host_link_bytes_per_s: float,
    timeline: Callable[[fx.GraphModule], Sequence[int]],
) -> int:
    """Start each prefetch early enough that the compute before its first use hides the
    copy, as the cost model assumed (``alternatives.AlternativePricer``): at the latest
    node from which the estimated time of the nodes up to its ``wait`` covers
    ``bytes / host link``. The split leaves it right before the ``wait``, which would
    expose the whole copy.

    A prefetch stays at its use when the compute below what it reads, another graphopt op
    or a placeholder cannot hide the copy (the cost model then charges the whole copy),
    and when moving it would raise the graph's peak: the early copy holds its tensor all
    the while, and the budget comes first. `timeline` (the simulation: bytes in use after
    each node) is read once, before any move; each move then adds the copy's bytes to the
    steps it now spans, so placing n prefetches costs one simulation, not n. Returns how
    many prefetches moved.
    """
    nodes = list(backward.graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    levels = list(timeline(backward)) or [0] * len(nodes)
    ceiling = max(levels, default=0)
    moved = 0
    for prefetch in list(backward.graph.find_nodes(op="call_function", target=PREFETCH)):
        waits = [user for user in prefetch.users if user.target is WAIT]
        if not waits:
            continue
        anchor = _hiding_start(prefetch, waits[0], node_ms, host_link_bytes_per_s)
        if anchor is None:
            continue
        spanned = range(position[anchor], position[prefetch])  # steps the copy now also spans
        size = value_bytes(prefetch.meta.get("val"))
        if any(levels[step] + size > ceiling for step in spanned):
            continue
        for step in spanned:
            levels[step] += size
        anchor.prepend(prefetch)
        moved += 1
    if moved:
        backward.graph.lint()
        backward.recompile()
    return moved


def _hiding_start(prefetch: fx.Node, wait: fx.Node, node_ms: Callable[[fx.Node], float], link_bytes_per_s: float) -> fx.Node | None:
    """The latest node from which compute up to `wait` hides the prefetch's copy, or None."""
    transfer_ms = value_bytes(prefetch.meta.get("val")) / link_bytes_per_s * 1e3
    anchor, covered = None, 0.0
    node = wait.prev
    while covered < transfer_ms and node.op == "call_function" and node not in prefetch.all_input_nodes:
        if node is not prefetch:
            if getattr(node.target, "namespace", None) == "graphopt":
                break  # another copy or wait: keep the graphopt ops in their order
            covered += node_ms(node)
            anchor = node
        node = node.prev
    return anchor if covered >= transfer_ms else None
