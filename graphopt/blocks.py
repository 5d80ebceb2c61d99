"""Plan a deep model from a few of its repeated blocks (MEMO's bi-level idea, simplified).

A transformer is an embedding, n identical blocks and a head. Tracing and planning all
n blocks costs time in proportion to n; a plan for the whole model can instead be
composed from traces of the same model with fewer blocks:

- ``deep``: the model with ``TRACED_BLOCKS`` (3) of its blocks, planned as usual. Its
  middle block stands for every block between the first and the last.
- ``shallow``: the model with 2 blocks, given the deep plan's decisions for the first
  and last block (matched by decision key, ``planner.decision_keys``).

Both traces count the whole model's parameters as static memory, so the difference of
their simulated peaks is what one more middle block adds at the peak (its saved
tensors, or its gradients when the peak is late in the backward), and the whole
model's peak is ``deep + (n - 3) * (deep - shallow)``: exact when the peak's place in
the step does not move with depth, which holds for a stack of identical blocks (a test
checks it against a full trace). A budget below what torch's min-cut needs is met by
bisecting the deep plan's budget; when that cannot fit the budget snugly, or the budget
is below the least peak composing reaches, the whole model is traced and planned as
usual, so composing never yields a worse plan (or a wrong least peak), only a faster one.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import re
from collections.abc import Callable
from typing import Protocol

import torch
import torch.fx as fx

from .budget import format_bytes
from .config import Options
from .errors import BudgetInfeasibleError, GraphoptError
from .plan import Decision, Plan
from .planner import clean_module_path
from .problem import KEEP, RECOMPUTE

log = logging.getLogger("graphopt")

TRACED_BLOCKS = 3
# A container with fewer blocks than this is traced whole: composing would save little.
MIN_BLOCKS = 6
# Bisection rounds on the 3-block plan's budget.
MAX_ROUNDS = 6
# A composed plan leaving more than this share of the usable budget unused is too
# loose: the whole model is traced and planned instead.
LOOSE_FRACTION = 0.05

@dataclasses.dataclass(frozen=True)
class RepeatedBlocks:
    """A ``ModuleList`` / ``Sequential`` of structurally identical blocks."""

    path: str  # "blocks", "model.layers"
    count: int
    kind: str  # the blocks' class name

    def describe(self) -> str:
        return f"{self.count} x {self.kind} in {self.path}"


def find_repeated_blocks(model: torch.nn.Module, min_count: int = MIN_BLOCKS) -> RepeatedBlocks | None:
    """The container of identical blocks holding the most parameters, if any.

    Blocks are identical when they have one class and the same parameter and buffer
    names, shapes and dtypes.
    """
    best, best_numel = None, 0
    for path, module in _containers_of_identical_blocks(model, min_count):
        numel = sum(p.numel() for p in module.parameters())
        if numel > best_numel:
            best, best_numel = RepeatedBlocks(path, len(module), type(module[0]).__name__), numel
    return best


def identical_blocks(model: torch.nn.Module, min_count: int = 2) -> list[tuple[str, torch.nn.Module]]:
    """Every container of at least `min_count` identical blocks, by path, leaving out
    those inside another one's blocks (an encoder's and a decoder's layers both; a
    block's own list of identical heads not)."""
    found: list[tuple[str, torch.nn.Module]] = []
    for path, module in _containers_of_identical_blocks(model, min_count):
        if not any(path.startswith(outer + ".") for outer, _ in found):
            found.append((path, module))
    return found


def _containers_of_identical_blocks(model: torch.nn.Module, min_count: int):
    """(path, container) of each ``ModuleList`` / ``Sequential`` of at least `min_count`
    identical blocks, outermost first."""
    for path, module in model.named_modules():
        if not path or not isinstance(module, (torch.nn.ModuleList, torch.nn.Sequential)) or len(module) < min_count:
            continue
        if len({_signature(child) for child in module}) == 1:
            yield path, module


def _signature(module: torch.nn.Module) -> tuple:
    tensors = list(module.named_parameters()) + list(module.named_buffers())
    return (type(module),) + tuple((name, tuple(t.shape), t.dtype) for name, t in tensors)


def with_blocks(model: torch.nn.Module, blocks: RepeatedBlocks, count: int) -> torch.nn.Module:
    """A shallow copy of `model` whose container holds its first `count` blocks.

    Modules along the container's path are copied (their child dicts too); everything
    else, parameters included, is shared with `model`.
    """
    root = parent = _copy_module(model)
    *ancestors, name = blocks.path.split(".")
    for ancestor in ancestors:
        child = _copy_module(parent._modules[ancestor])
        parent._modules[ancestor] = child
        parent = child
    container = parent._modules[name]
    kept = list(container)[:count]
    parent._modules[name] = torch.nn.ModuleList(kept) if isinstance(container, torch.nn.ModuleList) else torch.nn.Sequential(*kept)
    return root


def _copy_module(module: torch.nn.Module) -> torch.nn.Module:
    clone = copy.copy(module)
    clone._modules = dict(module._modules)
    return clone


class PlanningStep(Protocol):
    """A traced training step (``offline.TracedStep``)."""

    def plan(self, options: Options) -> list[Plan]: ...

    def plan_graphs(
        self, options: Options, given: dict[str, str] | None = None
    ) -> tuple[list[Plan], fx.GraphModule, fx.GraphModule]: ...


class ComposedPlanner:
    """Plans for the whole model, composed from a 3-block (`deep`) and a 2-block
    (`shallow`) trace of it."""

    def __init__(
        self,
        blocks: RepeatedBlocks,
        deep: PlanningStep,
        shallow: PlanningStep,
        trace_whole: Callable[[], PlanningStep],
    ):
        self.blocks = blocks
        self._deep = deep
        self._shallow = shallow
        self._trace_whole = trace_whole
        self._whole: PlanningStep | None = None

    @property
    def traced_whole(self) -> bool:
        """Whether composing gave way to a trace of the whole model (later plans use it)."""
        return self._whole is not None

    def plan(self, options: Options) -> list[Plan]:
        """The whole model's plan for `options` (raises ``BudgetInfeasibleError``).

        When composing cannot fit the budget snugly, the whole model is traced once and
        planned as usual (see `_fit`); later plans use that trace too.
        """
        if self._whole is None:
            try:
                return [self._plan_composed(options)]
            except _NotComposable as reason:
                log.info("planning %s on the whole model: %s", self.blocks.describe(), reason)
                self._whole = self._trace_whole()
        return self._whole.plan(options)

    def _plan_composed(self, options: Options) -> Plan:
        composed, _ = self._composed(dataclasses.replace(options, memory_budget_bytes=None), options)
        if options.memory_budget_bytes is None:
            return composed
        usable = int(options.memory_budget_bytes * (1 - options.prediction_headroom))
        if composed.predicted_peak_bytes > usable:
            composed = self._fit(options, usable)
        return dataclasses.replace(composed, budget_bytes=options.memory_budget_bytes)

    def _fit(self, options: Options, usable: int) -> Plan:
        """A composed plan whose peak fits the usable budget snugly (``_NotComposable``
        when there is none).

        The 3-block plan's budget is the knob: bisected between its least budget and the
        budget its own min-cut needs, judging each by the composed peak. The 3-block
        model's peak need not sit where the whole model's does (its gradients may
        dominate where the whole model's saved tensors do), so the knob can be coarse:
        a fitting plan leaving more than `LOOSE_FRACTION` of the budget unused is not
        taken.
        """
        low = self._least_budget(options)
        try:
            least = self._at(options, low)
        except BudgetInfeasibleError:
            # Planned again for its least budget, the 3-block model need not meet it:
            # its rounds are judged by the simulation and may stop on other plans.
            raise _NotComposable("the 3-block model does not meet its own least budget again") from None
        if least.predicted_peak_bytes > usable:
            # Repeating one block's least-peak decisions is not the least the whole model
            # can reach (its program may recompute more in the middle blocks, where the
            # 3-block model's peak is elsewhere): the whole trace decides what is reachable.
            raise _NotComposable("the budget is below the composed least peak")
        (loosest,), _, _ = self._deep.plan_graphs(dataclasses.replace(options, memory_budget_bytes=None))
        high = math.ceil(loosest.predicted_peak_bytes / (1 - options.prediction_headroom))
        best, previous = least, least.predicted_peak_bytes
        for _ in range(MAX_ROUNDS):
            if high - low <= 1:
                break
            middle = (low + high) // 2
            composed = self._at(options, middle)
            if composed.predicted_peak_bytes == previous:
                break  # the knob does not reach the whole model's peak here
            previous = composed.predicted_peak_bytes
            log.info("composed peak %s for a usable %s (3-block budget %s)", format_bytes(composed.predicted_peak_bytes), format_bytes(usable), format_bytes(middle))
            if composed.predicted_peak_bytes <= usable:
                low = middle
                if composed.predicted_added_ms < best.predicted_added_ms:
                    best = composed
            else:
                high = middle
        if usable - best.predicted_peak_bytes > LOOSE_FRACTION * usable:
            raise _NotComposable("composing leaves the budget loose")
        return best

    def _at(self, options: Options, deep_budget: int) -> Plan:
        return self._composed(dataclasses.replace(options, memory_budget_bytes=deep_budget), options)[0]

    def _least_budget(self, options: Options) -> int:
        """The 3-block model's least budget."""
        try:
            self._deep.plan_graphs(dataclasses.replace(options, memory_budget_bytes=1))
        except BudgetInfeasibleError as error:
            return error.least_budget_bytes
        raise AssertionError("a 1-byte budget was met")

    def _composed(self, deep_options: Options, options: Options) -> tuple[Plan, int]:
        """The whole model's plan from the 3-block plan for `deep_options` (its middle
        block repeated), and that 3-block plan's own peak."""
        deep_plans, _, _ = self._deep.plan_graphs(deep_options)
        if len(deep_plans) != 1:
            raise GraphoptError(f"composing a plan needs one graph per step, got {len(deep_plans)} (a graph break?)")
        (deep,) = deep_plans
        if any(decision.action not in (KEEP, RECOMPUTE) for decision in deep.decisions):
            # Offloaded and quantized copies change what a block holds where; composing
            # them is not checked against a full trace yet.
            raise _NotComposable("the plan offloads or quantizes")
        # Both depths are split the same way (as given plans), so their steps correspond.
        unconstrained = dataclasses.replace(options, memory_budget_bytes=None)
        deep_given = {decision.key: decision.planned_action for decision in deep.decisions}
        shallow_given = {}
        for key, action in deep_given.items():
            moved = self._moved(key, {0: 0, 2: 1})
            if moved is not None:
                shallow_given[moved] = action
        traced = []
        for step, given in ((self._deep, deep_given), (self._shallow, shallow_given)):
            (plan,), forward, backward = step.plan_graphs(unconstrained, given)
            traced.append(_Traced(plan, self._labels(forward), self._labels(backward)))
        timeline, num_forward_steps = self._timeline(*traced)
        shallow = traced[1].plan
        extra = self.blocks.count - TRACED_BLOCKS
        decisions = self._expanded(deep.decisions)
        memory = dict(deep.memory)
        memory["gradients"] = deep.memory["gradients"] + extra * (deep.memory["gradients"] - shallow.memory["gradients"])
        memory["parameters"] = deep.memory["parameters"] + deep.memory.get("other graphs", 0)
        memory["other graphs"] = 0
        composed = dataclasses.replace(
            deep,
            predicted_peak_bytes=max(timeline),
            predicted_added_ms=sum(d.added_ms for d in decisions),
            method=f"{deep.method}, composed from {TRACED_BLOCKS} of {self.blocks.count} blocks",
            memory=memory,
            decisions=decisions,
            timeline_bytes=tuple(timeline),
            num_forward_steps=num_forward_steps,
            reordering=(),  # what reordering did to the 3-block graphs says little of the whole
        )
        return composed, deep.predicted_peak_bytes

    def _timeline(self, deep: _Traced, shallow: _Traced) -> tuple[list[int], int]:
        """The whole model's memory timeline, and its number of forward steps.

        Steps outside the middle block are matched to the shallow trace's (same block,
        same rank among that block's steps); the difference is what one block more adds
        there, so the whole model has ``n - 3`` times it more. A middle-block step
        stands for the same step in blocks ``1 .. n-2``: in the forward each earlier
        block adds its saved tensors (``saved``, measured at the forward's end); in the
        backward block ``j`` still holds the saved tensors of blocks below it and the
        gradients of blocks above it (``grads``, measured at the backward's end).
        """
        extra = self.blocks.count - TRACED_BLOCKS
        middle = range(1, self.blocks.count - 1)
        deep_steps, shallow_steps = deep.plan.timeline_bytes, shallow.plan.timeline_bytes
        saved = deep_steps[deep.num_forward - 1] - shallow_steps[shallow.num_forward - 1]
        grads = deep_steps[-1] - shallow_steps[-1]
        matches = _matching_steps(deep, shallow)
        timeline, num_forward_steps = [], 0
        for part in ("forward", "backward"):
            steps, labels = deep.part(part)
            order = list(middle) if part == "forward" else list(reversed(middle))
            run: list[int] = []  # consecutive middle-block steps, emitted once per block
            for index, (value, label) in enumerate(zip(steps, labels)):
                if label == 1:
                    run.append(value)
                    if index + 1 < len(labels) and labels[index + 1] == 1:
                        continue
                    for block in order:
                        below, above = block - 1, (self.blocks.count - 2 - block) if part == "backward" else 0
                        timeline.extend(v + below * saved + above * grads for v in run)
                    run = []
                    continue
                match = matches.get((part, index))
                grown = extra * (value - match) if match is not None else extra * max(saved, grads)
                timeline.append(value + grown)
            if part == "forward":
                num_forward_steps = len(timeline)
        return timeline, num_forward_steps

    def _labels(self, graph_module: fx.GraphModule) -> list[int | None]:
        """The block each node of a split graph belongs to, or None (embedding, head).

        A node without a module stack (a parameter's placeholder, the residual
        gradient's sum between blocks) belongs where its inputs, or else its users, are,
        when that is one place.
        """
        nodes = list(graph_module.graph.nodes)
        label = {node: self._node_block(node) for node in nodes}
        for node in nodes:
            if label[node] is None:
                label[node] = _only({label[source] for source in node.all_input_nodes})
        for node in reversed(nodes):
            if label[node] is None and node.op != "output":
                label[node] = _only({label[user] for user in node.users if user.op != "output"})
        return [None if label[node] == _OUTSIDE else label[node] for node in nodes]

    def _node_block(self, node: fx.Node) -> int | None:
        """The block in the node's module stack; _OUTSIDE for another module; None without a stack."""
        stack = node.meta.get("nn_module_stack") or node.meta.get("fwd_nn_module_stack") or {}
        for raw, _kind in stack.values():
            index = self._block_index(clean_module_path(raw) + ".")
            if index is not None:
                return index
        return _OUTSIDE if stack else None

    def _expanded(self, decisions: tuple[Decision, ...]) -> tuple[Decision, ...]:
        """Decisions for every block: the first and last as traced, the middle one repeated."""
        last = self.blocks.count - 1
        expanded = []
        for decision in decisions:
            index = self._block_index(decision.key)
            targets = {None: [None], 0: [0], 2: [last]}.get(index, range(1, last))
            for target in targets:
                mapping = {} if target is None else {index: target}
                key = self._moved(decision.key, mapping) if mapping else decision.key
                tensor = self._moved(decision.tensor, mapping) if mapping else decision.tensor
                expanded.append(dataclasses.replace(decision, node=key, key=key, tensor=tensor))
        return tuple(expanded)

    def _block_index(self, name: str) -> int | None:
        match = re.match(rf"{re.escape(self.blocks.path)}\.(\d+)(?=[.:])", name)
        return int(match.group(1)) if match else None

    def _moved(self, name: str, mapping: dict[int, int]) -> str | None:
        """`name` with its block index renumbered by `mapping`; None for an unmapped block."""
        index = self._block_index(name)
        if index is None:
            return name
        if index not in mapping:
            return None
        prefix = f"{self.blocks.path}.{index}"
        return f"{self.blocks.path}.{mapping[index]}{name[len(prefix):]}"


class _NotComposable(Exception):
    """Composing cannot give this plan: the whole model is planned instead."""


@dataclasses.dataclass(frozen=True)
class _Traced:
    """One traced depth's plan with the block of each of its timeline's steps."""

    plan: Plan
    forward_labels: list[int | None]
    backward_labels: list[int | None]

    @property
    def num_forward(self) -> int:
        return len(self.forward_labels)

    def part(self, part: str) -> tuple[tuple[int, ...], list[int | None]]:
        steps = self.plan.timeline_bytes
        if part == "forward":
            return steps[: self.num_forward], self.forward_labels
        return steps[self.num_forward :], self.backward_labels


_OUTSIDE = -1  # a node of a module outside the blocks (embedding, head)


def _only(labels: set[int | None]) -> int | None:
    """The one known place among `labels`, else None."""
    known = labels - {None}
    return next(iter(known)) if len(known) == 1 else None


def _matching_steps(deep: _Traced, shallow: _Traced) -> dict[tuple[str, int], int]:
    """Memory at the shallow step matching each deep step outside the middle block.

    Deep blocks 0 and 2 are shallow blocks 0 and 1; a step matches the step of the same
    rank among its block's steps, when both traces have equally many such steps.
    """
    renumber = {None: None, 0: 0, 2: 1}
    matches = {}
    for part in ("forward", "backward"):
        deep_steps, deep_labels = deep.part(part)
        shallow_steps, shallow_labels = shallow.part(part)
        for label, shallow_label in renumber.items():
            mine = [i for i, l in enumerate(deep_labels) if l == label]
            theirs = [i for i, l in enumerate(shallow_labels) if l == shallow_label]
            if len(mine) == len(theirs):
                matches.update({(part, i): shallow_steps[j] for i, j in zip(mine, theirs)})
    return matches
