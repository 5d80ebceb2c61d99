"""graphopt's graph passes, declared in the order they run.

Each pass is a function in a file of its own here, named for what it does (verb_object):
it takes a graph and returns the rewritten graph with what it reports. ``PIPELINE``
declares them in order, each at the stage of compilation whose graph it rewrites:

- ``dynamo``: the graph Dynamo captured, before AOTAutograd traces its backward;
- ``joint``: the joint forward + backward graph, before the planner decides;
- ``decided``: the joint graph once the plan has decided what to save, before the split;
- ``split``: the forward and backward graphs the split gives.

The planner (graphopt/planner.py, graphopt/chunking.py) orchestrates: it runs each
stage's passes in this order through ``run_stage``, binding each to what it needs from
the step (the plan's decisions, the optimizer, ``trainable=``, ``--fsdp``), and each plan lists the
passes that ran on its graph and those the user disabled (``Plan.passes``).
``graphopt.compile(..., disable_passes=["reorder_graph"])`` skips passes by name; a pass
that carries out an option in use (``prune_frozen`` for ``trainable=``, the updates for
``optimizer=``) cannot be disabled while it is. Splitting the joint graph with the saved
set is not a pass: it is ``torch_private.split_joint_graph``. The ops the passes insert
live in graphopt/ops/.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar

from ..errors import GraphoptError

DYNAMO, JOINT, DECIDED, SPLIT = "dynamo", "joint", "decided", "split"
DISABLED = "disabled"  # the report of a pass the user disabled


@dataclasses.dataclass(frozen=True)
class GraphPass:
    name: str  # verb_object: its file under graphopt/passes/ and its name in disable_passes=
    stage: str
    does: str
    without: str  # what a step is like with the pass disabled
    # The option the pass carries out, while it is in use the pass cannot be disabled.
    carries_out: str | None = None


PIPELINE: tuple[GraphPass, ...] = (
    GraphPass(
        "chunk_loss", DYNAMO,
        "computes the head + cross-entropy in chunks along the tokens when no plan fits without (docs/chunking.md)",
        "the logits are always whole",
    ),
    GraphPass(
        "prune_frozen", JOINT,
        "drops the backward work only frozen parameters and rows need (docs/sparse_finetune.md)",
        "nothing is frozen", carries_out="trainable=",
    ),
    GraphPass(
        "insert_updates", JOINT,
        "consumes each managed gradient by its parameter's update inside the backward (docs/optimizer_in_backward.md)",
        "the optimizer steps after the backward", carries_out="optimizer=",
    ),
    GraphPass(
        "shard_parameters", JOINT,
        "plans one FSDP2 rank (graphopt plan --fsdp N): block parameters as shards, all-gathered around their "
        "uses, gradients reduce-scattered (docs/distributed.md)",
        "every parameter is whole for the step", carries_out="--fsdp",
    ),
    GraphPass(
        "lower_saves", DECIDED,
        "rewrites offload and quantize decisions into copies before the split (docs/offload_quantize.md)",
        "the program only keeps or recomputes",
    ),
    GraphPass(
        "hoist_prefetches", SPLIT,
        "starts each prefetch early enough for the compute before its use to hide the copy",
        "a prefetch starts right before its use, its copy exposed",
    ),
    GraphPass(
        "place_updates", SPLIT,
        "places each optimizer update right after its parameter's last read in the split backward",
        "the optimizer steps after the backward", carries_out="optimizer=",
    ),
    GraphPass(
        "reorder_graph", SPLIT,
        "memory-aware order of the split graphs, with reorder=True (docs/reorder.md)",
        "Inductor orders the graphs",
    ),
)
PASS_NAMES = tuple(graph_pass.name for graph_pass in PIPELINE)


@dataclasses.dataclass(frozen=True)
class PassRun:
    """A pass of the pipeline on one graph, and what it reported (``DISABLED`` when the
    user disabled it)."""

    name: str
    report: str = ""


G = TypeVar("G")
# A pass bound to one step: the graph in, the rewritten graph and its report out; None
# when the pass has nothing to do on this graph (it is then not listed).
BoundPass = Callable[[G], "tuple[G, str] | None"]


def check_disabled(names: Iterable[str], in_use: Mapping[str, bool]) -> frozenset[str]:
    """The passes `disable_passes=` names, checked: each a pass of the pipeline, none that
    carries out an option in use (`in_use`: option -> whether the user set it)."""
    if isinstance(names, str):
        names = [names]
    disabled = frozenset(names)
    unknown = sorted(disabled - set(PASS_NAMES))
    if unknown:
        raise GraphoptError(f"disable_passes names unknown pass(es) {unknown}; the passes, in order: {list(PASS_NAMES)}")
    for graph_pass in PIPELINE:
        if graph_pass.name in disabled and graph_pass.carries_out and in_use.get(graph_pass.carries_out):
            raise GraphoptError(
                f"disable_passes={sorted(disabled)}: {graph_pass.name} carries out {graph_pass.carries_out}, which is "
                f"set; leave {graph_pass.carries_out} out instead ({graph_pass.without})"
            )
    return disabled


def run_stage(stage: str, graph: G, bound: Mapping[str, BoundPass], disabled: frozenset[str]) -> tuple[G, tuple[PassRun, ...]]:
    """Run the passes of `stage` on `graph` in the pipeline's order, each as `bound` binds
    it; those in `disabled` are skipped and listed as such."""
    stage_passes = [graph_pass.name for graph_pass in PIPELINE if graph_pass.stage == stage]
    if set(bound) != set(stage_passes):
        raise GraphoptError(f"the {stage} stage binds {sorted(bound)}, its passes are {stage_passes}")
    runs = []
    for name in stage_passes:
        if name in disabled:
            runs.append(PassRun(name, DISABLED))
            continue
        result = bound[name](graph)
        if result is not None:
            graph, report = result
            runs.append(PassRun(name, report))
    return graph, tuple(runs)


def in_pipeline_order(runs: Iterable[PassRun]) -> tuple[PassRun, ...]:
    """Runs of several stages, in the pipeline's order."""
    return tuple(sorted(runs, key=lambda run: PASS_NAMES.index(run.name)))
