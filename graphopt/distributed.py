"""What one rank holds under DDP and FSDP2, for a per-rank budget (docs/distributed.md).

graphopt plans on top of PyTorch's data parallelism; it does not move or recompute a
collective. Under ``DistributedDataParallel`` the compiled graph is the whole model's
and the rank holds, beside it, every parameter and DDP's gradient buckets. Under FSDP2
(``fully_shard``) a rank holds its parameter shards and gradient shards between steps;
each compiled graph's parameter inputs are the unsharded parameters FSDP2 all-gathers
before it runs and frees after, and around them FSDP2 holds another unit's all-gathered
parameters (prefetch) and the copy of a unit's gradients it reduce-scatters. Those are
counted here at the size of the largest unit's, for the whole step.

A plan counts its graph's inputs itself and what the rest of the model holds as static
memory: ``model_static_bytes`` less the graph's parameter inputs (``Session``). Under
FSDP2 the graph's parameter inputs are the all-gathered ones, so ``total_bytes``
includes the largest unit's all-gathered parameters, which a graph's inputs replace.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence

import torch


@dataclasses.dataclass(frozen=True)
class RankMemory:
    """Bytes one rank holds for the model outside its compiled graphs, by kind.

    ``parameters`` and ``buffers`` are this rank's storage (an FSDP2 parameter's local
    shard, padding included); ``root_parameters`` the FSDP2 root unit's parameters
    whole (``graphopt plan --fsdp``: the root is not resharded after its forward);
    ``gradient_buckets`` DDP's flat all-reduce buckets (as
    large as the gradients); ``gradient_shards`` the gradient shards FSDP2's
    reduce-scatters write; ``gathered_parameters`` the largest FSDP2 unit's unsharded
    parameters (those of the unit whose graph runs: a graph's plan counts its own parameter
    inputs in their place); ``gathered_reserve`` the largest FSDP2 unit's unsharded
    parameters when the model has several units (another unit's all-gather while a graph
    runs); ``reduce_scatter_reserve`` the largest unit's unsharded gradients (the copy
    FSDP2 reduce-scatters from). Planning one rank offline (``offline.fsdp_rank_memory``)
    counts both reserves twice over: the step there is one graph, whose own windows are
    per parameter, not per unit.
    """

    parameters: int = 0
    buffers: int = 0
    root_parameters: int = 0
    gradient_buckets: int = 0
    gradient_shards: int = 0
    gathered_parameters: int = 0
    gathered_reserve: int = 0
    reduce_scatter_reserve: int = 0

    @property
    def total_bytes(self) -> int:
        return (
            self.parameters
            + self.buffers
            + self.root_parameters
            + self.gradient_buckets
            + self.gradient_shards
            + self.gathered_parameters
            + self.gathered_reserve
            + self.reduce_scatter_reserve
        )

    def reserves(self) -> tuple[tuple[str, int], ...]:
        """The nonzero kinds no graph has among its inputs, in words: each plan shows
        them on lines of their own (``Options.rank_reserves``) instead of inside "other
        graphs"."""
        kinds = (
            ("DDP gradient buckets", self.gradient_buckets),
            ("FSDP2 gradient shards", self.gradient_shards),
            ("FSDP2 all-gather reserve", self.gathered_reserve),
            ("FSDP2 reduce-scatter reserve", self.reduce_scatter_reserve),
        )
        return tuple((kind, size) for kind, size in kinds if size)

    def by_kind(self) -> dict[str, int]:
        """The nonzero kinds, in words."""
        kinds = {
            "parameters (this rank's)": self.parameters,
            "buffers": self.buffers,
            "FSDP2 root unit's parameters, whole for the step": self.root_parameters,
            "DDP gradient buckets": self.gradient_buckets,
            "FSDP2 gradient shards": self.gradient_shards,
            "FSDP2 all-gathered parameters (largest unit)": self.gathered_parameters,
            "FSDP2 all-gather reserve": self.gathered_reserve,
            "FSDP2 reduce-scatter reserve": self.reduce_scatter_reserve,
        }
        return {kind: size for kind, size in kinds.items() if size}


def rank_memory(model: object) -> RankMemory:
    """What this rank holds for `model` (a module, plain, DDP-wrapped or FSDP2-sharded)."""
    if not isinstance(model, torch.nn.Module):
        return RankMemory()
    parameters = _storage_bytes(model.parameters())
    buffers = _storage_bytes([*model.parameters(), *model.buffers()]) - parameters  # a shared storage once
    trained = [p for p in model.parameters() if p.requires_grad]
    if is_ddp(model):
        return RankMemory(parameters, buffers, gradient_buckets=sum(_full_bytes(p) for p in trained))
    units = fsdp_units(model)
    if not units:
        return RankMemory(parameters, buffers)
    unit_parameters = [_unit_parameters(unit, units) for unit in units]
    largest = max(sum(_full_bytes(p) for p in members) for members in unit_parameters)
    largest_gradients = max(sum(_full_bytes(p) for p in members if p.requires_grad) for members in unit_parameters)
    return RankMemory(
        parameters,
        buffers,
        gradient_shards=_storage_bytes(trained),
        gathered_parameters=largest,
        gathered_reserve=largest if len(units) > 1 else 0,
        reduce_scatter_reserve=largest_gradients,
    )


def graph_runs(model: object) -> Callable[[Sequence[object]], int] | None:
    """For a model with several FSDP2 units: how many times per step a graph may run
    before its first backward, from its example inputs. Dynamo breaks the graph at each
    unit and compiles one graph for units of one class (the same forward code), called
    once per unit; a graph whose parameter inputs are a unit's (FSDP2 registers the
    unsharded parameters on the unit while it runs) runs at most as many times as there
    are units of that class. An over-count (a unit compiled again for other guards)
    only reserves more. None for other models: every graph runs once."""
    if not isinstance(model, torch.nn.Module):
        return None
    units = fsdp_units(model)
    if len(units) < 2:
        return None

    def runs(example_inputs: Sequence[object]) -> int:
        inputs = {id(value) for value in example_inputs if isinstance(value, torch.Tensor)}
        for unit in reversed(units):  # innermost first
            if any(id(p) in inputs for p in _unit_parameters(unit, units)):
                return sum(type(other) is type(unit) for other in units)
        return 1

    return runs


def is_ddp(model: object) -> bool:
    """Whether `model` is wrapped in ``torch.nn.parallel.DistributedDataParallel``."""
    return torch.distributed.is_available() and isinstance(model, torch.nn.parallel.DistributedDataParallel)


def fsdp_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules ``fully_shard`` was applied to, outermost first."""
    if not torch.distributed.is_available():
        return []
    from torch.distributed.fsdp import FSDPModule

    return [module for module in model.modules() if isinstance(module, FSDPModule)]


def _unit_parameters(unit: torch.nn.Module, units: list[torch.nn.Module]) -> list[torch.nn.Parameter]:
    """The parameters FSDP2 all-gathers for `unit`: its own, less those of units inside it."""
    nested = {id(p) for other in units if other is not unit and _contains(unit, other) for p in other.parameters()}
    return [p for p in unit.parameters() if id(p) not in nested]


def _contains(outer: torch.nn.Module, inner: torch.nn.Module) -> bool:
    return any(module is inner for module in outer.modules())


def _full_bytes(tensor: torch.Tensor) -> int:
    """Bytes of the whole (unsharded) tensor; a DTensor's shape is its global one."""
    return tensor.numel() * tensor.element_size()


def local_bytes(tensor: torch.Tensor) -> int:
    """Bytes of this rank's part of `tensor` (a DTensor's local shard, unpadded)."""
    local = _local(tensor)
    return local.numel() * local.element_size()


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of `tensor`: a DTensor's local shard, or the tensor."""
    if not torch.distributed.is_available():
        return tensor
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the storages behind `tensors` on this rank, each counted once."""
    storages = {}
    for tensor in tensors:
        storage = _local(tensor).untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())
