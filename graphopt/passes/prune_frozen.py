"""Sparse backward: prune the joint graph's work for frozen parameters and channels.

The joint graph returns one gradient per graph input. For a frozen parameter that
output becomes ``None``; dead-code elimination then removes every backward node only
it needed, and with them the forward tensors only those nodes read (a frozen Linear's
input, when nothing else in the backward reads it), which are then never saved.

A partly trainable parameter (the first ``rows`` output channels, dim 0) gets its
gradient computed on those rows only: the row slice is pushed up the gradient's
producer chain through ops that map it to a slice of their inputs (``mm``, ``permute``,
``view``, ``sum`` over other dims, pointwise ops), as long as each producer feeds only
this gradient, so its full-size version dies. The weight gradient of a Linear thus
becomes ``mm(grad_output[:, :rows]^T, input)``: ``rows / out`` of the FLOPs. The
gradient is returned full size, zero in the frozen rows (``constant_pad_nd``, which
Inductor fuses into the kernel writing it): autograd requires a gradient of the
parameter's shape and torch's dense optimizers read it as such, so the buffer itself
cannot shrink; what shrinks is the work, and the zero rows keep the frozen channels
unchanged under the optimizer (see ``trainable.FrozenRowsGuard`` for weight decay).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.fx as fx

from .. import torch_private
from ..cost_models import node_flops
from ..cost_models.memory import allocated_bytes, storage_owner
from ..errors import GraphoptError
from ..plan import Pruning
from ..torch_private import JointGraph
from ..trainable import GraphTrainable

aten = torch.ops.aten


def prune_frozen(joint: JointGraph, trainable: GraphTrainable) -> tuple[JointGraph, Pruning]:
    """The joint graph without the gradient work of frozen parameters and channels.

    ``trainable.rows`` maps a graph input's index to how many of its leading rows train
    (0: frozen); inputs not in it train fully. Returns the re-prepared joint graph and
    what was removed.
    """
    saved_before, flops_before = _saved_bytes(joint), _backward_flops(joint)
    output = joint.module.graph.find_nodes(op="output")[0]
    outputs = list(output.args[0])
    gradients = outputs[joint.num_fwd_outputs :]
    _check_inputs_are_primals(joint, trainable, len(gradients))
    frozen, partial = [], []
    names = trainable.names
    for index, trained in sorted(trainable.rows.items()):
        gradient = gradients[index]
        if not isinstance(gradient, fx.Node):
            continue  # no gradient anyway (requires_grad=False)
        if trained == 0:
            gradients[index] = None
            frozen.append(names[index])
        elif trained < gradient.meta["val"].shape[0]:
            gradients[index] = _partial_gradient(joint.module.graph, gradient, trained)
            partial.append(names[index])
    output.args = (type(output.args[0])(outputs[: joint.num_fwd_outputs] + gradients),)
    joint.module.recompile()
    static_indices = [i for i, primal in enumerate(joint.primals) if primal in joint.static_inputs]
    pruned = torch_private.prepare_joint_graph(
        joint.module, num_fwd_outputs=joint.num_fwd_outputs, static_lifetime_input_indices=static_indices
    )
    report = Pruning(
        frozen_parameters=tuple(frozen),
        partial_parameters=tuple(partial),
        saved_bytes_before=saved_before,
        saved_bytes_after=_saved_bytes(pruned),
        backward_flops_before=flops_before,
        backward_flops_after=_backward_flops(pruned),
        backward_nodes_before=len(joint.backward_nodes),
        backward_nodes_after=len(pruned.backward_nodes),
    )
    return pruned, report


def _check_inputs_are_primals(joint: JointGraph, trainable: GraphTrainable, num_gradients: int) -> None:
    """Dynamo's inputs must be AOTAutograd's primals one for one (``primals_{i+1}`` is
    input ``i``), as they are when AOTAutograd adds no parameters of its own and merges
    no aliased inputs; otherwise the wrong tensor would be frozen, so refuse."""
    values = [primal.meta.get("val") for primal in joint.primals]
    primal_shapes = [tuple(v.shape) if isinstance(v, torch.Tensor) else None for v in values]
    same = len(primal_shapes) == len(trainable.input_shapes) == num_gradients and all(
        primal_shapes[index] == trainable.input_shapes[index] for index in trainable.rows
    )
    if not same:
        raise GraphoptError(
            f"trainable= cannot be applied to this graph: its {len(trainable.input_shapes)} inputs do not map one for "
            f"one onto the joint graph's {len(primal_shapes)} primals and {num_gradients} gradients (AOTAutograd "
            "lifted or merged inputs, e.g. aliased parameters). Use trainable='all' or set requires_grad=False on "
            "the frozen parameters yourself."
        )


def _saved_bytes(joint: JointGraph) -> int:
    """Bytes of the forward tensors the backward reads: what a save-everything cut keeps."""
    backward = set(joint.backward_nodes)
    read = {
        storage_owner(node)
        for node in joint.forward_nodes
        if node.op == "call_function" and any(user in backward for user in node.users)
    }
    return sum(allocated_bytes(node) for node in read if node.op == "call_function")


def _backward_flops(joint: JointGraph) -> float:
    return sum(node_flops(node) for node in joint.backward_nodes)


# ----------------------------------------------------------------------------- row slices


def _partial_gradient(graph: fx.Graph, gradient: fx.Node, rows: int) -> fx.Node:
    """`gradient` computed on its first `rows` rows, padded back to full size with zeros."""
    with graph.inserting_before(gradient):
        sliced = _leading(graph, gradient, 0, rows)
        full = gradient.meta["val"].shape[0]
        padding = [0, 0] * (gradient.meta["val"].dim() - 1) + [0, full - rows]
        return _insert(graph, aten.constant_pad_nd.default, (sliced, padding, 0.0), like=gradient)


def _leading(graph: fx.Graph, node: fx.Node, dim: int, rows: int) -> fx.Node:
    """A node for ``node[..., :rows, ...]`` (slice of `dim`), computing only that part
    when `node` feeds nothing else and a rule maps the slice onto its inputs."""
    rule = _rule(node)
    if rule is not None and len(node.users) == 1:
        narrowed = rule(graph, node, dim, rows)
        if narrowed is not None:
            return narrowed
    return _insert(graph, aten.slice.Tensor, (node, dim, 0, rows), like=node)


def _insert(graph: fx.Graph, target, args: tuple, *, like: fx.Node) -> fx.Node | None:
    """A new call of `target` carrying `like`'s source metadata and its own fake value;
    None when the op rejects these inputs (a view of a non-viewable slice)."""
    values = [a.meta["val"] if isinstance(a, fx.Node) else a for a in args]
    try:
        value = target(*values)
    except RuntimeError:
        return None
    node = graph.call_function(target, args)
    node.meta.update({k: v for k, v in like.meta.items() if k not in ("val", "tensor_meta")})
    node.meta["val"] = value
    return node


def _rule(node: fx.Node) -> Callable | None:
    if node.op != "call_function":
        return None
    if node.target in _RULES:
        return _RULES[node.target]
    if torch_private.is_pointwise(node) and not node.kwargs:
        return _pointwise
    return None


def _mm(graph: fx.Graph, node: fx.Node, dim: int, rows: int) -> fx.Node | None:
    left, right = node.args
    if dim == 0:
        return _insert(graph, aten.mm.default, (_leading(graph, left, 0, rows), right), like=node)
    return _insert(graph, aten.mm.default, (left, _leading(graph, right, 1, rows)), like=node)


def _permute(graph: fx.Graph, node: fx.Node, dim: int, rows: int) -> fx.Node | None:
    source, order = node.args
    narrowed = _leading(graph, source, order[dim] % len(order), rows)
    return _insert(graph, aten.permute.default, (narrowed, order), like=node)


def _view(graph: fx.Graph, node: fx.Node, dim: int, rows: int) -> fx.Node | None:
    """A view keeps a dim when the dims before it and after it only regroup among themselves."""
    source, shape = node.args[0], list(node.meta["val"].shape)
    source_shape = list(source.meta["val"].shape)
    outer, inner = math.prod(shape[:dim]), math.prod(shape[dim + 1 :])
    for source_dim, size in enumerate(source_shape):
        before, after = math.prod(source_shape[:source_dim]), math.prod(source_shape[source_dim + 1 :])
        if size == shape[dim] and before == outer and after == inner:
            narrowed = _leading(graph, source, source_dim, rows)
            new_shape = shape[:dim] + [rows] + shape[dim + 1 :]
            return _insert(graph, node.target, (narrowed, new_shape), like=node)
    return None


def _sum(graph: fx.Graph, node: fx.Node, dim: int, rows: int) -> fx.Node | None:
    source, dims = node.args[0], node.args[1]
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if node.kwargs.get("dtype") is not None or not dims:  # no dims: a sum over all of them
        return None
    rank = source.meta["val"].dim()
    reduced = {d % rank for d in dims}
    kept = list(range(rank)) if keepdim else [d for d in range(rank) if d not in reduced]
    if kept[dim] in reduced:
        return None
    narrowed = _leading(graph, source, kept[dim], rows)
    return _insert(graph, node.target, (narrowed, dims, keepdim), like=node)


def _pointwise(graph: fx.Graph, node: fx.Node, dim: int, rows: int) -> fx.Node | None:
    """Each tensor input sliced where it is not broadcast along `dim`."""
    value = node.meta["val"]
    args = []
    for argument in node.args:
        if isinstance(argument, fx.Node) and isinstance(argument.meta.get("val"), torch.Tensor):
            shape = argument.meta["val"].shape
            own = dim - (value.dim() - len(shape))
            if own >= 0 and shape[own] == value.shape[dim]:
                argument = _leading(graph, argument, own, rows)
        elif isinstance(argument, (fx.Node, list, tuple)):
            return None
        args.append(argument)
    return _insert(graph, node.target, tuple(args), like=node)


_RULES: dict[object, Callable] = {
    aten.mm.default: _mm,
    aten.permute.default: _permute,
    aten.view.default: _view,
    aten._unsafe_view.default: _view,
    aten.sum.dim_IntList: _sum,
}
