"""Bytes of the tensors an FX node produces, read from FakeTensor metadata, aliasing-aware.

A view allocates nothing: its storage belongs to the node it views, and keeping the view
alive keeps that storage alive. Multi-output ops (``native_layer_norm``) hold their bytes
in the ``getitem`` nodes that pick the outputs, so each tensor is counted once.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
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


def concrete_size(value: object) -> int | None:
    """An int size, or a symbolic one's hint (the value it was traced at); None for an
    unbacked symbol, which has none."""
    if isinstance(value, int):
        return value
    hint = getattr(getattr(value, "node", None), "hint", None)
    return int(hint) if hint is not None else None


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
    readers keep what it views alive); outputs live on. Inductor's wrapper then moves
    memory in two ways: a pointwise kernel writes its output over an input that dies in it
    (``_inplace_writes``), and a dead buffer is kept for a later allocation of its size
    (``_reuse_holds``). `input_storage` names the inputs the graph owns (the backward owns
    its saved tensors), mapped to a storage key: inputs sharing a key are one allocation.
    Other inputs (parameters) are someone else's memory and not counted.
    """
    input_storage = input_storage or {}
    nodes = list(graph_module.graph.nodes)
    step = {node: i for i, node in enumerate(nodes)}
    owner, representative = storage_owners(nodes, input_storage)
    owner = functools.cache(owner)
    sizes = {node: _buffer_bytes(node, representative, input_storage) for node in nodes}
    buffers = _buffers(nodes, step, owner, sizes)
    storages = _storages(buffers, _inplace_writes(buffers, owner, step))
    holds = _reuse_holds(storages, _inductor_estimate(nodes, step, owner, sizes, buffers), _kernel_counts(nodes, buffers))
    return _levels(storages + holds, len(nodes))


@dataclasses.dataclass
class _Buffer:
    """One allocation: `node`'s buffer, live from the kernel at step `born` through the
    one at step `dies` (the graph's length: it outlives the graph). `holder` is the last
    node whose value it stores (a kernel may write over a dying input's buffer)."""

    node: fx.Node
    size: int
    born: int
    dies: int
    holder: fx.Node


def _buffers(
    nodes: list[fx.Node], step: dict[fx.Node, int], owner: Callable[[fx.Node], fx.Node], sizes: dict[fx.Node, int]
) -> list[_Buffer]:
    """Every buffer the graph allocates or owns, in node order, freed after its last reader."""
    last_read = _last_reads(nodes, owner, step)
    buffers: list[_Buffer] = []
    born_at: dict[fx.Node, int] = {}
    ready: dict[fx.Node, int] = {}
    for node in nodes:
        size = sizes[node]
        if not size:
            ready[node] = _ready_step(node, step, ready)
            continue
        born = step[allocated_by(node)]
        producer = _fused_producer(node, owner, sizes, step)
        if producer is not None and _ready_without(node, producer, owner, ready) <= born_at[producer]:
            born = min(born, born_at[producer])
        born_at[node] = ready[node] = born
        buffers.append(_Buffer(node, size, born, max(last_read.get(node, step[node]), born), node))
    return buffers


def _last_reads(nodes: list[fx.Node], owner: Callable[[fx.Node], fx.Node], reads_at: dict[fx.Node, int]) -> dict[fx.Node, int]:
    """The last step at which each buffer is read, a node reading its inputs at
    `reads_at`; the graph's output reads at its end."""
    last_read: dict[fx.Node, int] = {}
    for node in nodes:
        reach = len(nodes) if node.op == "output" else reads_at[node]
        for source in node.all_input_nodes:
            key = owner(source)
            last_read[key] = max(last_read.get(key, -1), reach)
    return last_read


def _inductor_estimate(
    nodes: list[fx.Node],
    step: dict[fx.Node, int],
    owner: Callable[[fx.Node], fx.Node],
    sizes: dict[fx.Node, int],
    buffers: list[_Buffer],
) -> list[int]:
    """The live bytes Inductor's reuse guard reads (``memory.estimate_peak_memory``).

    It counts what its scheduler sees: a buffer read through a value fused into later
    kernels lives until the last of them, in-place writes are not credited, and graph
    inputs named as parameters or tangents are left out.
    """
    kernel_reads = _last_reads(nodes, owner, _computed_at(nodes, step, sizes))
    estimated = [
        dataclasses.replace(buffer, dies=max(kernel_reads.get(buffer.node, buffer.dies), buffer.born))
        for buffer in buffers
        if buffer.node.op != "placeholder" or torch_private.inductor_estimates_input(buffer.node.name)
    ]
    return _levels(estimated, len(nodes))


def _computed_at(nodes: list[fx.Node], step: dict[fx.Node, int], sizes: dict[fx.Node, int]) -> dict[fx.Node, int]:
    """The step whose kernel reads each node's inputs: its own, or for a value fused into
    its readers (and a view, read where its readers are) the last of theirs, since every
    kernel it is fused into recomputes it."""
    computed: dict[fx.Node, int] = {}
    for node in reversed(nodes):
        if node.op == "output":
            computed[node] = len(nodes)
        elif _fused_away(node, sizes):
            computed[node] = max((computed[user] for user in node.users), default=step[node])
        else:
            computed[node] = step[node]
    return computed


def _fused_away(node: fx.Node, sizes: dict[fx.Node, int]) -> bool:
    """A view, or a value computed inside its readers' kernels rather than stored."""
    if node.op != "call_function" or sizes[node] or node.meta.get(HOST_MEMORY):
        return False
    return _aliases_input(node) or allocated_bytes(node) > 0


def _inplace_writes(
    buffers: list[_Buffer], owner: Callable[[fx.Node], fx.Node], step: dict[fx.Node, int]
) -> dict[fx.Node, _Buffer]:
    """The buffers Inductor writes over a dying input instead of allocating
    (``Scheduler.decide_inplace_update``), each with the buffer it takes.

    A generated pointwise kernel takes an input buffer of the same size, dtype and layout
    that no later kernel reads. Of the graph's inputs only those AOTAutograd donates
    qualify: saved tensors the graph owns, not parameters (not owned) or tangents (owned
    but never donated; the same names Inductor's estimate leaves out).
    """
    by_node = {buffer.node: buffer for buffer in buffers}
    taken: set[fx.Node] = set()
    writes: dict[fx.Node, _Buffer] = {}
    for buffer in buffers:
        node = buffer.node
        if buffer.born != step[node] or not torch_private.is_fusible(node) or not torch_private.wrapper_allocates(node):
            continue
        for source in node.all_input_nodes:
            dying = by_node.get(owner(source))
            if (
                dying is None
                or dying.node in taken
                or dying.dies != buffer.born
                or dying.born == buffer.born
                or dying.size != buffer.size
                or tensor_dtype(dying.node) != tensor_dtype(node)
                or not (_same_layout(source, node) and _same_layout(dying.node, node))
                or (dying.node.op == "placeholder" and not torch_private.inductor_estimates_input(dying.node.name))
            ):
                continue
            taken.add(dying.node)
            writes[node] = dying
            break
    return writes


def _same_layout(a: fx.Node, b: fx.Node) -> bool:
    """Whether element i of `a` and of `b` sit at the same offset in their buffers."""
    va, vb = a.meta.get("val"), b.meta.get("val")
    if not isinstance(va, torch.Tensor) or not isinstance(vb, torch.Tensor) or va.numel() != vb.numel():
        return False
    if va.is_contiguous() and vb.is_contiguous():
        return True
    return va.shape == vb.shape and va.stride() == vb.stride()


def _storages(buffers: list[_Buffer], writes: dict[fx.Node, _Buffer]) -> list[_Buffer]:
    """The allocations that exist once in-place writes are made: a buffer written over a
    dying input lives on in that input's allocation."""
    storage_of: dict[fx.Node, _Buffer] = {}
    storages: list[_Buffer] = []
    for buffer in buffers:
        taken = writes.get(buffer.node)
        if taken is None:
            storage = dataclasses.replace(buffer)
            storages.append(storage)
        else:
            storage = storage_of[taken.node]
            storage.dies, storage.holder = buffer.dies, buffer.node
        storage_of[buffer.node] = storage
    return storages


def _kernel_counts(nodes: list[fx.Node], buffers: list[_Buffer]) -> list[int]:
    """How many kernels have run by each step (a step runs one if it allocates or calls
    an extern op): Inductor's reuse guard counts in kernels, not nodes."""
    runs = {buffer.born for buffer in buffers if buffer.node.op != "placeholder"}
    counts, count = [], 0
    for index, node in enumerate(nodes):
        count += index in runs or torch_private.is_compute_intensive(node)
        counts.append(count)
    return counts


def _reuse_holds(storages: list[_Buffer], estimate: list[int], kernels: list[int]) -> list[_Buffer]:
    """The dead buffers Inductor's wrapper keeps allocated for a later buffer of the same
    size and dtype (``AllocateLine.plan``), as allocations spanning the wait.

    The wrapper pools every buffer it frees (not the graph's inputs) and hands an
    allocation the last one freed of its size, if the kernels are back to back or if the
    buffer plus the peak of its estimate in between stays within the estimate's overall
    peak (``should_reuse_buffer``). Each hold raises the estimate in between, as it does
    in Inductor. The estimate misses in-place writes, so holds can rise above the
    simulated peak, as they do in the generated code.
    """
    peak = max(estimate, default=0)
    allocating: dict[int, list[_Buffer]] = collections.defaultdict(list)
    freeing: dict[int, list[_Buffer]] = collections.defaultdict(list)
    for storage in storages:
        if torch_private.wrapper_allocates(storage.node):
            allocating[storage.born].append(storage)
        if storage.dies < len(estimate) and storage.holder.op == "call_function":
            freeing[storage.dies].append(storage)
    pool: dict[tuple, list[_Buffer]] = collections.defaultdict(list)
    holds: list[_Buffer] = []
    for now in range(len(estimate)):
        for storage in allocating.get(now, ()):
            freed = pool.get((tensor_dtype(storage.node), storage.size))
            if not freed:
                continue
            start = freed[-1].dies + 1
            back_to_back = kernels[now - 1] == kernels[start - 1]
            if back_to_back or storage.size + max(estimate[start:now], default=0) <= peak:
                freed.pop()
                if start < now:
                    holds.append(_Buffer(storage.node, storage.size, start, now - 1, storage.node))
                    estimate[start:now] = [level + storage.size for level in estimate[start:now]]
        for storage in freeing.get(now, ()):
            pool[tensor_dtype(storage.holder), storage.size].append(storage)
    return holds


def _levels(buffers: list[_Buffer], steps: int) -> list[int]:
    """Bytes live at each step: what is allocated by then, less what died before it."""
    delta = [0] * (steps + 1)
    for buffer in buffers:
        delta[buffer.born] += buffer.size
        if buffer.dies < steps:
            delta[buffer.dies + 1] -= buffer.size
    levels, live = [], 0
    for change in delta[:steps]:
        live += change
        levels.append(live)
    return levels


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
