"""Bytes of the tensors an FX node produces, read from FakeTensor metadata, aliasing-aware.

A view allocates nothing: its storage belongs to the node it views, and keeping the view
alive keeps that storage alive. Multi-output ops (``native_layer_norm``) hold their bytes
in the ``getitem`` nodes that pick the outputs, so each tensor is counted once.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

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


def _aliases_input(node: fx.Node) -> bool:
    """A view, or a getitem of a multi-output view (``unbind``, ``split``)."""
    if torch_private.is_view(node):
        return True
    return is_getitem(node) and isinstance(node.args[0], fx.Node) and torch_private.is_view(node.args[0])


def allocated_bytes(node: fx.Node) -> int:
    """Bytes this node newly allocates (0 for views, tuples and non-tensor values)."""
    if node.op == "output" or _aliases_input(node):
        return 0
    value = node.meta.get("val")
    if isinstance(value, (list, tuple)):
        return 0  # counted in the getitem nodes that pick each output
    return value_bytes(value)


def allocated_by(node: fx.Node) -> fx.Node:
    """The node whose step allocates `node`'s buffer: a multi-output op allocates every
    output when it runs, its inputs still alive; anything else allocates its own."""
    if is_getitem(node) and not _aliases_input(node) and isinstance(node.args[0], fx.Node):
        return node.args[0]
    return node


def storage_owner(node: fx.Node) -> fx.Node:
    """The node whose allocation a view (chain) aliases; the node itself otherwise."""
    while _aliases_input(node) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def tensor_dtype(node: fx.Node) -> torch.dtype | None:
    value = node.meta.get("val")
    return value.dtype if isinstance(value, torch.Tensor) else None


def is_materialized(node: fx.Node, users: list[fx.Node] | tuple[fx.Node, ...]) -> bool:
    """Whether Inductor gives the node's output a buffer of its own.

    Pointwise chains fuse: a pointwise node read only by pointwise nodes (`users`, from
    the same graph) is computed inside its consumers' kernel and never stored. A view
    has no kernel to fuse into: its readers are what reads the value (a GELU read
    through a ``view`` by a matmul is stored). An output picked from a multi-output op
    is stored when that op is (flash attention's gradients are the extern kernel's
    allocations, whatever reads them).
    """
    if allocated_bytes(node) == 0:
        return False
    if not users or not _fusible(node):
        return True
    return not all(_fuses(user) for user in users)


def _fusible(node: fx.Node) -> bool:
    """Whether Inductor can compute the node's value inside another kernel. torch's op
    list calls every ``getitem`` fusible; the op it picks from decides."""
    if is_getitem(node) and isinstance(node.args[0], fx.Node):
        return torch_private.is_fusible(node.args[0])
    return torch_private.is_fusible(node)


def _fuses(reader: fx.Node) -> bool:
    """Whether `reader` computes the value it reads inside its own kernel."""
    if _aliases_input(reader):
        return all(_fuses(user) for user in reader.users)
    return _fusible(reader)


def storage_owners(
    nodes: list[fx.Node], input_storage: dict[str, object]
) -> tuple[Callable[[fx.Node], fx.Node], dict[object, fx.Node]]:
    """The buffer a node's value lives in (what a view views, and one representative
    placeholder per owned input storage), and those representatives by storage key."""
    representative: dict[object, fx.Node] = {}
    for node in nodes:
        if node.op == "placeholder" and node.name in input_storage:
            representative.setdefault(input_storage[node.name], node)

    def owner(node: fx.Node) -> fx.Node:
        node = storage_owner(node)
        if node.op == "placeholder" and node.name in input_storage:
            return representative[input_storage[node.name]]
        return node

    return owner, representative


def graph_timeline(graph_module: fx.GraphModule, input_storage: dict[str, object] | None = None) -> list[int]:
    """Bytes in use after each node of one compiled graph, as Inductor allocates and frees them.

    A buffer is allocated by the node that writes it: a multi-output op writes all its
    outputs (``allocated_by``), a producer's kernel writes a stored pointwise node fused
    into it (``_fused_producer``). Every buffer is freed after its last reader (a view's
    readers keep what it views alive); outputs live on. `input_storage` names the inputs the graph owns (the
    backward owns its saved tensors), mapped to a storage key: inputs sharing a key are
    one allocation. Other inputs (parameters) are someone else's memory and not counted.
    """
    input_storage = input_storage or {}
    nodes = list(graph_module.graph.nodes)
    step = {node: i for i, node in enumerate(nodes)}
    owner, representative = storage_owners(nodes, input_storage)

    last_read: dict[fx.Node, int] = {}
    for node in nodes:
        reach = len(nodes) if node.op == "output" else step[node]
        for source in node.all_input_nodes:
            key = owner(source)
            last_read[key] = max(last_read.get(key, -1), reach)
    sizes = {node: _buffer_bytes(node, representative, input_storage) for node in nodes}
    born_at: dict[fx.Node, int] = {}
    ready: dict[fx.Node, int] = {}
    allocs: dict[int, int] = {}
    frees: dict[int, int] = {}
    for node in nodes:
        size = sizes[node]
        if not size:
            ready[node] = _ready_step(node, step, ready)
            continue
        born = step[allocated_by(node)]
        producer = _fused_producer(node, owner, sizes, step)
        if producer is not None and _ready_without(node, producer, owner, ready) <= born_at[producer]:
            born = min(born, born_at[producer])
        born_at[node] = born
        ready[node] = born
        allocs[born] = allocs.get(born, 0) + size
        dies = max(last_read.get(node, step[node]), born)
        if dies < len(nodes):
            frees[dies] = frees.get(dies, 0) + size
    live, timeline = 0, []
    for index in range(len(nodes)):
        live += allocs.get(index, 0)
        timeline.append(live)
        live -= frees.get(index, 0)
    return timeline


def _ready_step(node: fx.Node, step: dict[fx.Node, int], ready: dict[fx.Node, int]) -> int:
    """The earliest step at which a kernel could compute `node`, which has no buffer of
    its own (a stored value is ready when its buffer is written: ``born_at``).

    An extern op is ready when it runs; a value fused away or a view is ready when
    everything it reads is.
    """
    if node.op == "placeholder":
        return 0
    if torch_private.is_compute_intensive(node):
        return step[node]
    return max((ready[source] for source in node.all_input_nodes), default=0)


def _ready_without(node: fx.Node, producer: fx.Node, owner: Callable[[fx.Node], fx.Node], ready: dict[fx.Node, int]) -> int:
    """When all of `node`'s inputs other than `producer`'s buffer are ready."""
    return max((ready[source] for source in node.all_input_nodes if owner(source) is not producer), default=0)


def _fused_producer(
    node: fx.Node, owner: Callable[[fx.Node], fx.Node], sizes: dict[fx.Node, int], step: dict[fx.Node, int]
) -> fx.Node | None:
    """The stored buffer whose kernel a stored pointwise node joins, if any.

    Inductor fuses a pointwise node into the kernel of a generated (not extern)
    producer it reads, even when both values are stored: one kernel then writes both,
    so both exist at once, beside the producer's inputs (the stack of attention's q, k,
    v gradients and its transposed copy). The latest such producer is taken; the caller
    fuses only if the node's other inputs are ready by the time that kernel runs (a
    residual stream's gradient sums terms made by later matmuls, so it cannot join them).
    """
    if node.op != "call_function" or is_getitem(node) or not torch_private.is_fusible(node):
        return None
    producers = [
        buffer
        for buffer in (owner(source) for source in node.all_input_nodes)
        if sizes.get(buffer)
        and buffer.op == "call_function"
        and not is_getitem(buffer)
        and not torch_private.is_compute_intensive(buffer)
    ]
    return max(producers, key=step.__getitem__, default=None)


# Marks a node whose value lives in host memory, not the device's (an offloaded copy
# when planning for a GPU; set by graphopt/passes/lower_saves.py).
HOST_MEMORY = "graphopt_host_memory"


def _buffer_bytes(node: fx.Node, representative: dict, input_storage: dict) -> int:
    if node.meta.get(HOST_MEMORY):
        return 0
    if node.op == "placeholder":
        key = input_storage.get(node.name)
        if key is None or representative[key] is not node:
            return 0
        return value_bytes(node.meta.get("val"))
    if node.op == "call_function" and is_materialized(node, list(node.users)):
        return allocated_bytes(node)
    return 0
