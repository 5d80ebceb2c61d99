"""Offloading a saved tensor to host memory: the custom ops ``passes/lower_saves.py`` puts in the graph.

Forward::

    host = graphopt.offload(x)              # starts the device-to-host copy on a side stream
    host = graphopt.wait(host, keepalive=x) # after x's last forward use: the copy is done

Backward::

    back = graphopt.prefetch(host, device)     # starts the host-to-device copy, ahead of use
    back = graphopt.wait(back, keepalive=host) # just before the first use

The split puts each prefetch next to its wait; ``passes/hoist_prefetches.py`` then moves it
up the backward graph until the compute in between hides the copy.

``wait`` returns its first argument (an alias, declared in its schema) and is marked as
having a side effect, so dead-code elimination keeps it and no pass may drop the order
it imposes; the ``keepalive`` argument keeps the copy's source alive until the copy has
finished. On CUDA the copies run on one side stream into pinned memory and ``wait``
makes the compute stream wait on the copy's event; anywhere else (CPU tests) the copies
are plain host-to-host clones and ``wait`` has nothing to wait for, so the graph
rewrite and its gradients can be checked without a GPU.

The event travels with the tensor the copy fills (an attribute of that tensor, which
``wait`` takes off), not in a table: nothing outlives the tensors of one step, and two
compiled models, or a tensor allocated where a freed one was, cannot see each other's
copies. A ``wait`` handed some other alias of the copy (no event on it) waits for every
copy queued on the side stream so far: slower, never wrong.
"""

from __future__ import annotations

import torch
from torch.fx import has_side_effect

# One side stream per device, shared by every compiled model: a stream is a device
# resource like a handle, and one stream keeps the copies in the order they were issued.
_side_streams: dict[torch.device, torch.cuda.Stream] = {}
# The attribute a copy's destination carries its event in, until `wait` takes it.
_COPY_EVENT = "_graphopt_copy_event"


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device)
    return _side_streams[device]


def _copy_on_side_stream(source: torch.Tensor, destination: torch.Tensor) -> torch.Tensor:
    """Copy asynchronously after everything queued so far; `wait` completes it."""
    device = source.device if source.is_cuda else destination.device
    stream = _side_stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        destination.copy_(source, non_blocking=True)
        event = torch.cuda.Event()
        event.record(stream)
    attach_copy_event(destination, event)
    return destination


def attach_copy_event(destination: torch.Tensor, event: object) -> None:
    """Let `destination` carry the event its copy records, for `wait`."""
    destination.__dict__[_COPY_EVENT] = event


def take_copy_event(tensor: torch.Tensor) -> object | None:
    """The event `tensor`'s copy recorded, removed from it; None when it carries none."""
    return tensor.__dict__.pop(_COPY_EVENT, None)


@torch.library.custom_op("graphopt::offload", mutates_args=())
def offload(tensor: torch.Tensor) -> torch.Tensor:
    """A host copy of `tensor` (pinned, filled asynchronously on CUDA)."""
    if not tensor.is_cuda:
        return tensor.clone()
    host = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, pin_memory=True)
    return _copy_on_side_stream(tensor, host)


@offload.register_fake
def _(tensor: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device="cpu")


@torch.library.custom_op("graphopt::prefetch", mutates_args=())
def prefetch(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy of the host tensor on `device` (filled asynchronously on CUDA)."""
    if device.type != "cuda":
        return tensor.clone()
    back = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device=device)
    return _copy_on_side_stream(tensor, back)


@prefetch.register_fake
def _(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device=device)


_library = torch.library.Library("graphopt", "FRAGMENT")
_library.define("wait(Tensor(a) tensor, Tensor? keepalive=None) -> Tensor(a)")


@torch.library.impl("graphopt::wait", "CompositeExplicitAutograd")
def _wait(tensor: torch.Tensor, keepalive: torch.Tensor | None = None) -> torch.Tensor:
    # The copy ran on the device of the prefetched tensor, or of the offloaded source.
    device = tensor.device if tensor.is_cuda else getattr(keepalive, "device", None)
    event = take_copy_event(tensor)
    if event is not None:
        torch.cuda.current_stream(device).wait_event(event)
    elif device is not None and device in _side_streams:
        torch.cuda.current_stream(device).wait_stream(_side_streams[device])
    return tensor


@torch.library.register_fake("graphopt::wait")
def _wait_fake(tensor: torch.Tensor, keepalive: torch.Tensor | None = None) -> torch.Tensor:
    return tensor


has_side_effect(torch.ops.graphopt.wait.default)

OFFLOAD = torch.ops.graphopt.offload.default
PREFETCH = torch.ops.graphopt.prefetch.default
WAIT = torch.ops.graphopt.wait.default
