"""Bytes of the tensors an FX node produces, read from FakeTensor metadata, aliasing-aware.

A view allocates nothing: its storage belongs to the node it views, and keeping the view
alive keeps that storage alive. Multi-output ops (``native_layer_norm``) hold their bytes
in the ``getitem`` nodes that pick the outputs, so each tensor is counted once.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .. import torch_private


def _int(value: object) -> int:
    """A concrete int for a possibly symbolic size (its hint when symbolic)."""
    if isinstance(value, int):
        return value
    node = getattr(value, "node", None)
    hint = getattr(node, "hint", None) if node is not None else None
    if hint is not None:
        return int(hint)
    return int(value)  # raises for unbacked symbols, which we cannot size


def value_bytes(value: object) -> int:
    """Bytes of a tensor value (the extent its strides reach), 0 for non-tensors."""
    if isinstance(value, (list, tuple)):
        return sum(value_bytes(v) for v in value)
    if not isinstance(value, torch.Tensor):
        return 0
    if value.numel() == 0:
        return 0
    extent = 1 + sum((_int(size) - 1) * abs(_int(stride)) for size, stride in zip(value.shape, value.stride()))
    return extent * value.element_size()


def is_getitem(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is operator.getitem


def allocated_bytes(node: fx.Node) -> int:
    """Bytes this node newly allocates (0 for views, tuples and non-tensor values)."""
    if node.op == "output" or torch_private.is_view(node):
        return 0
    value = node.meta.get("val")
    if isinstance(value, (list, tuple)):
        return 0  # counted in the getitem nodes that pick each output
    return value_bytes(value)


def storage_owner(node: fx.Node) -> fx.Node:
    """The node whose allocation a view (chain) aliases; the node itself otherwise."""
    while torch_private.is_view(node) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def tensor_dtype(node: fx.Node) -> torch.dtype | None:
    value = node.meta.get("val")
    return value.dtype if isinstance(value, torch.Tensor) else None


def is_materialized(node: fx.Node, users: list[fx.Node] | tuple[fx.Node, ...]) -> bool:
    """Whether Inductor gives the node's output a buffer of its own.

    Pointwise chains fuse: a pointwise node read only by pointwise nodes (`users`, from
    the same graph) is computed inside its consumers' kernel and never stored.
    """
    if allocated_bytes(node) == 0:
        return False
    if not users or not torch_private.is_fusible(node):
        return True
    return not all(torch_private.is_fusible(user) for user in users)


def graph_timeline(graph_module: fx.GraphModule, *, count_inputs: bool) -> list[int]:
    """Bytes in use after each node of one compiled graph, as Inductor frees them.

    Every buffer is freed after its last reader (a view's readers keep what it views
    alive); outputs live on. With ``count_inputs`` the graph's inputs are owned by it
    (the backward's saved tensors are) and freed after their last use too.
    """
    nodes = list(graph_module.graph.nodes)
    step = {node: i for i, node in enumerate(nodes)}
    last_read: dict[fx.Node, int] = {}
    output_node = nodes[-1]
    for node in nodes:
        for source in node.all_input_nodes:
            owner = storage_owner(source)
            reach = len(nodes) if node is output_node else step[node]
            last_read[owner] = max(last_read.get(owner, -1), reach)
    frees: dict[int, int] = {}
    live, timeline = 0, []
    for node in nodes:
        if node.op == "placeholder":
            size = value_bytes(node.meta.get("val")) if count_inputs else 0
        elif node.op == "call_function":
            size = allocated_bytes(node) if is_materialized(node, list(node.users)) else 0
        else:
            size = 0
        live += size
        timeline.append(live)
        dies = last_read.get(node, step[node])
        if size and dies < len(nodes):
            frees[dies] = frees.get(dies, 0) + size
        live -= frees.pop(step[node], 0)
    return timeline
