"""``graphopt plan --fsdp N``: one FSDP2 rank's step planned offline (docs/distributed.md).

A stack of parameter-heavy blocks on a small batch, on meta tensors: the plan of one
rank must hold the block parameters as shards, gather each again for the backward, and
reduce-scatter the block gradients, so its peak falls with the number of ranks.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from graphopt import offline
from graphopt.errors import GraphoptError
from graphopt.ops.fsdp import shard_shape

WIDTH, BLOCKS, ROWS = 256, 4, 32


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(WIDTH, 4 * WIDTH)
        self.down = nn.Linear(4 * WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(nn.functional.gelu(self.up(x)))


class Stack(nn.Module):
    def __init__(self, blocks: int = BLOCKS) -> None:
        super().__init__()
        self.embed = nn.Linear(WIDTH, WIDTH)
        self.blocks = nn.ModuleList(Block() for _ in range(blocks))
        self.head = nn.Linear(WIDTH, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x).square().mean()


def _model_and_batch(blocks: int = BLOCKS, rows: int = ROWS):
    with torch.device("meta"):
        return Stack(blocks), (torch.empty(rows, WIDTH),)


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _plan(ranks: int | None, blocks: int = BLOCKS, rows: int = ROWS, **settings):
    model, batch = _model_and_batch(blocks, rows)
    (plan,) = offline.plan_model(model, batch, hardware="cpu", fsdp=ranks, **settings)
    return model, plan


def test_one_rank_holds_block_parameters_as_shards_and_the_root_whole():
    ranks = 4
    model, plan = _plan(ranks)
    blocks = [p for block in model.blocks for p in block.parameters()]
    root = [*model.embed.parameters(), *model.head.parameters()]
    block_shards = sum(torch.Size(shard_shape(p.shape, ranks)).numel() * p.element_size() for p in blocks)
    assert plan.memory["parameters"] == block_shards + _bytes(root)
    # The backward's outputs: the root's gradients whole, each block gradient's shard.
    assert plan.memory["gradients"] == block_shards + _bytes(root)
    run = next(run for run in plan.passes if run.name == "shard_parameters")
    assert run.report == f"{len(blocks)} parameters over {ranks} ranks"

    held = offline.fsdp_rank_memory(model, ranks)
    largest_block = _bytes(model.blocks[0].parameters())
    assert held.root_parameters == _bytes(root)
    # A block whole while it runs and the next one prefetched; a block's gradients and
    # the copy FSDP2 reduce-scatters from: each on a line of its own in the plan.
    assert plan.memory["FSDP2 all-gather reserve"] == held.gathered_reserve == 2 * largest_block
    assert plan.memory["FSDP2 reduce-scatter reserve"] == held.reduce_scatter_reserve == 2 * largest_block
    # Beside the graph's inputs and the reserves: the rank's shards of the root.
    root_shards = sum(torch.Size(shard_shape(p.shape, ranks)).numel() * p.element_size() for p in root)
    assert plan.memory["other graphs"] == root_shards

    gathered = [d for d in plan.decisions if d.reason.startswith("gathered again")]
    # Every block weight the backward reads (for its input's gradient) is gathered
    # again, never kept from the forward.
    assert len(gathered) >= 2 * BLOCKS
    assert all(d.action == "recompute" and d.added_ms == 0 for d in gathered)


def test_more_ranks_hold_less():
    # 8 blocks: composed from 3 traced ones (blocks.py), as a deep model is.
    peaks = {ranks: _plan(ranks, blocks=8)[1].predicted_peak_bytes for ranks in (None, 2, 8)}
    assert peaks[8] < peaks[2] < peaks[None]
    # Parameters and their gradients are most of this step: at 8 ranks about half,
    # the reserves of four blocks' worth included.
    assert peaks[8] < 0.6 * peaks[None]


def test_a_budget_is_met_per_rank():
    rows = 1024  # activations worth recomputing
    _, loose = _plan(8, rows=rows)
    budget = int(0.8 * loose.predicted_peak_bytes)
    _, plan = _plan(8, rows=rows, memory_budget=budget)
    assert plan.predicted_peak_bytes <= budget
    assert any(d.action == "recompute" and not d.reason.startswith("gathered again") for d in plan.decisions)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"fsdp": 0}, "positive integer"),
        ({"fsdp": 2, "ddp": True}, "not both"),
        ({"fsdp": 2, "trainable": ["blocks.0.*"]}, "trainable= is not supported"),
        ({"fsdp": 2, "disable_passes": ["shard_parameters"]}, "carries out --fsdp"),
    ],
)
def test_what_cannot_be_planned_for_a_rank_is_refused(settings, message):
    model, _ = _model_and_batch()
    with pytest.raises(GraphoptError, match=message):
        offline.options_for(model, hardware="cpu", **settings)
