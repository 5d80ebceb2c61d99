"""FSDP2's collectives as ops of a planned graph: ``graphopt plan --fsdp N`` only.

Planning one FSDP2 rank's step offline (passes/shard_parameters.py), a block's parameter
enters the graph as this rank's shard and is all-gathered where the block uses it; its
gradient is reduce-scattered into this rank's gradient shard. These two ops stand for
those collectives in the graph the planner analyses: they have the right shapes, so the
planner sees the unsharded parameter appear and go and the full gradient die, and they
cost nothing to the plan, since FSDP2 issues them whatever the plan decides. They are
never run: a plan made with them describes a rank under FSDP2, where the real
collectives run outside graphopt's graphs (docs/distributed.md).
"""

from __future__ import annotations

import math

import torch

from ..errors import GraphoptError


def shard_shape(shape: torch.Size | tuple[int, ...], ranks: int) -> tuple[int, ...]:
    """The shape of one rank's shard of a parameter of `shape`: FSDP2 splits dim 0 in
    `ranks` parts, padding the last (every rank allocates the padded size)."""
    if not shape:
        return ()
    return (math.ceil(shape[0] / ranks), *shape[1:])


def _planning_only(name: str) -> GraphoptError:
    return GraphoptError(
        f"graphopt::{name} stands for an FSDP2 collective in a graph `graphopt plan --fsdp` plans; it is never run"
    )


@torch.library.custom_op("graphopt::fsdp_all_gather", mutates_args=())
def fsdp_all_gather(shard: torch.Tensor, size: list[int]) -> torch.Tensor:
    """The unsharded parameter of `size` whose shard this rank holds."""
    raise _planning_only("fsdp_all_gather")


@fsdp_all_gather.register_fake
def _(shard: torch.Tensor, size: list[int]) -> torch.Tensor:
    return shard.new_empty(size)


@torch.library.custom_op("graphopt::fsdp_reduce_scatter", mutates_args=())
def fsdp_reduce_scatter(gradient: torch.Tensor, ranks: int) -> torch.Tensor:
    """This rank's shard of the sum of `gradient` over `ranks` ranks."""
    raise _planning_only("fsdp_reduce_scatter")


@fsdp_reduce_scatter.register_fake
def _(gradient: torch.Tensor, ranks: int) -> torch.Tensor:
    return gradient.new_empty(shard_shape(gradient.shape, ranks))


ALL_GATHER = torch.ops.graphopt.fsdp_all_gather.default
REDUCE_SCATTER = torch.ops.graphopt.fsdp_reduce_scatter.default
COLLECTIVES = frozenset({ALL_GATHER, REDUCE_SCATTER})
