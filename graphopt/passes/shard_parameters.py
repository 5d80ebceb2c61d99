"""One FSDP2 rank's step, for planning it offline: ``graphopt plan --fsdp N``.

Under per-block ``fully_shard`` (torchtitan's layout) a rank holds each block's
parameters as its shards; FSDP2 all-gathers a block's parameters before the block's
forward and frees them after it (``reshard_after_forward``), all-gathers them again for
its backward, and reduce-scatters the block's gradients into gradient shards once its
backward is done. The root unit (embeddings, final norm, head) is not resharded after
the forward: its parameters stay whole for the step and its gradients are
reduce-scattered at the end.

The step traced offline is one joint graph holding every parameter whole. This pass
rewrites it into what one rank holds: each block parameter's input becomes its shard
(``ops/fsdp.py``: dim 0 split in N, padded), read through an all-gather inserted before
its first forward use and tagged to be recomputed (gathered again) for the backward,
with every view of it; each block gradient is reduce-scattered into its shard as soon
as it is made. The planner then sees a block's unsharded parameters live from their
first to their last use in each pass, and a full gradient die where it is made. FSDP2
holds a unit's parameters (and its gradients) together for the whole block, and
prefetches the next unit's: the reserves of ``offline.fsdp_rank_memory`` cover
that, at the largest unit's size.
"""

from __future__ import annotations

import dataclasses

import torch.fx as fx

from .. import torch_private
from ..cost_models.memory import storage_owner
from ..ops.fsdp import ALL_GATHER, REDUCE_SCATTER, shard_shape


@dataclasses.dataclass(frozen=True)
class GraphSharding:
    """Which inputs of one traced graph are sharded block parameters, and over how many ranks."""

    ranks: int
    sharded: frozenset[int]  # positions among the graph's primals


def shard_parameters(joint: torch_private.JointGraph, sharding: GraphSharding) -> tuple[torch_private.JointGraph, int]:
    """The joint graph as one rank of `sharding.ranks` holds it, and how many parameters
    it shards."""
    graph = joint.module.graph
    output = graph.output_node()
    outputs = list(output.args[0])
    first_gradient = len(outputs) - len(joint.primals)
    forward = set(joint.forward_nodes)
    order = {node: i for i, node in enumerate(graph.nodes)}  # inserting nodes keeps these in order
    sharded = 0
    for position, primal in enumerate(joint.primals):
        value = primal.meta.get("val")
        users = [user for user in primal.users if user in forward]
        if position not in sharding.sharded or value is None or value.dim() == 0 or not users:
            continue
        primal.meta["val"] = value.new_empty(shard_shape(value.shape, sharding.ranks))
        gathered = _gather_before(graph, primal, min(users, key=order.__getitem__), list(value.shape))
        primal.replace_all_uses_with(gathered, delete_user_cb=lambda user: user is not gathered)
        for node in _aliases(gathered):  # gathered again for the backward, never kept
            torch_private.require_recompute(node)
        gradient = outputs[first_gradient + position]
        if isinstance(gradient, fx.Node):
            emit = torch_private.NodeEmitter(graph, insert_before=gradient.next, side="backward")
            outputs[first_gradient + position] = emit(REDUCE_SCATTER, gradient, sharding.ranks)
        sharded += 1
    if not sharded:
        return joint, 0
    output.args = (tuple(outputs),)
    graph.lint()
    joint.module.recompile()
    static_indices = [i for i, p in enumerate(joint.primals) if p in joint.static_inputs]
    prepared = torch_private.prepare_joint_graph(
        joint.module, num_fwd_outputs=joint.num_fwd_outputs, static_lifetime_input_indices=static_indices
    )
    return prepared, sharded


_PROVENANCE = ("nn_module_stack", "stack_trace")


def _gather_before(graph: fx.Graph, shard: fx.Node, first_use: fx.Node, size: list[int]) -> fx.Node:
    emit = torch_private.NodeEmitter(graph, insert_before=first_use, side=None)
    gathered = emit(ALL_GATHER, shard, size)
    for key in _PROVENANCE:  # named in the plan after the module that reads it first
        if key in first_use.meta:
            gathered.meta[key] = first_use.meta[key]
    return gathered


def _aliases(node: fx.Node) -> set[fx.Node]:
    """`node` and every view (chain) of it."""
    found, stack = {node}, [node]
    while stack:
        for user in stack.pop().users:
            if user not in found and storage_owner(user) is node:
                found.add(user)
                stack.append(user)
    return found
