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
