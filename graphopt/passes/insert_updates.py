"""Consume each managed gradient inside the backward: the joint graph with the
optimizer's updates (``optimizer=``; the op and its runtime: graphopt/ops/apply_update.py).
"""

from __future__ import annotations


from .. import torch_private
from ..cost_models.memory import storage_owner
from ..ops.apply_update import APPLY_UPDATE, GraphUpdates
from .place_updates import place_update


def insert_updates(joint: torch_private.JointGraph, updates: GraphUpdates) -> torch_private.JointGraph:
    """The joint graph with each managed gradient consumed by its parameter's update.

    Each update node is tagged to stay in the backward; its gradient output becomes
    ``None``. In the joint graph it sits after the parameter's last read, which is
    where the analysis sees the gradient die; `place_updates` (passes/place_updates.py) places it again in each
    split backward, whose order differs (recomputation, reordering). Reading the
    parameter, it also makes every split save the parameter for the backward.
    """
    if not updates.slots:
        return joint
    graph = joint.module.graph
    output = graph.output_node()
    outputs = list(output.args[0])
    first_gradient = len(outputs) - len(joint.primals)
    for position, primal in enumerate(joint.primals):
        slot = updates.slots.get(primal.name)
        gradient = outputs[first_gradient + position]
        if slot is None or gradient is None:
            continue
        with graph.inserting_after(gradient):
            update = graph.call_function(APPLY_UPDATE, (primal, gradient, slot, []))
        update.meta["val"] = None
        torch_private.pin_to(update, "backward")
        outputs[first_gradient + position] = None
        place_update(update, {primal} | {node for node in graph.nodes if storage_owner(node) is primal})
    output.args = (tuple(outputs),)
    graph.lint()
    joint.module.recompile()
    static_indices = [i for i, p in enumerate(joint.primals) if p in joint.static_inputs]
    return torch_private.prepare_joint_graph(
        joint.module, num_fwd_outputs=joint.num_fwd_outputs, static_lifetime_input_indices=static_indices
    )
