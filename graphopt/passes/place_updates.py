"""Place each optimizer update in a split backward as early as its reads allow
(``optimizer=``; the updates are inserted by passes/insert_updates.py).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .. import torch_private
from ..cost_models.memory import storage_owner
from ..ops.apply_update import APPLY_UPDATE


def place_updates(backward: fx.GraphModule, joint: torch_private.JointGraph) -> fx.GraphModule:
    """Move each update in a split backward right after the last read of its parameter
    and the end of its gradient, so the gradient is freed as early as the reads allow.

    The backward's placeholders carry the joint graph's names: a saved forward tensor
    that is a view of the parameter counts as a read of it.
    """
    updates = list(backward.graph.find_nodes(op="call_function", target=APPLY_UPDATE))
    if not updates:
        return backward
    joint_nodes = {node.name: node for node in joint.module.graph.nodes}
    placeholders = backward.graph.find_nodes(op="placeholder")
    for update in updates:
        parameter = update.args[0]
        primal = joint_nodes[parameter.name]
        saved_views = {p for p in placeholders if p.name in joint_nodes and storage_owner(joint_nodes[p.name]) is primal}
        aliases = {parameter} | saved_views
        aliases |= {node for node in backward.graph.nodes if storage_owner(node) in aliases}
        update.args = (*update.args[:3], _readers(update, aliases))
        place_update(update, aliases)
    backward.graph.lint()
    backward.recompile()
    return backward


def _readers(update: fx.Node, aliases: set[fx.Node]) -> list[fx.Node]:
    """The tensors computed from the parameter other than its views (`aliases`), in
    graph order; a multi-output reader by its ``getitem``s."""
    users = {user for alias in aliases for user in alias.users} - aliases - {update}
    tensors = set()
    for user in users:
        if isinstance(user.meta.get("val"), (tuple, list)):
            tensors |= {item for item in user.users if isinstance(item.meta.get("val"), torch.Tensor)}
        elif user.op == "call_function" and isinstance(user.meta.get("val"), torch.Tensor):
            tensors.add(user)
    return [node for node in update.graph.nodes if node in tensors]


def place_update(update: fx.Node, aliases: set[fx.Node]) -> None:
    """Move `update` right after its gradient and every other reader of `aliases`."""
    order = {node: index for index, node in enumerate(update.graph.nodes)}
    readers = [user for alias in aliases for user in alias.users if user is not update and user.op != "output"]
    last = max([update.args[1], *readers], key=order.__getitem__)
    if last.next is not update:
        last.append(update)
