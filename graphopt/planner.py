"""The planning step: joint graph in, forward and backward graphs plus a ``Plan`` out.

Only this step decides. It analyses the joint graph into a plain problem, solves it,
splits the graph with the chosen saved set, and checks the result by simulating the
memory of the real forward and backward graphs; when the simulation exceeds what the
program predicted, it tightens the program's budget by the difference and solves again.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import re
import sys
import time
from collections.abc import Callable, Sequence

import torch
import torch.fx as fx

from . import torch_private
from .alternatives import AlternativeSettings
from .analysis import Analysis, NodeCost, analyze, parameter_bytes
from .budget import format_bytes, least_budget_shown
from .config import Options
from .cost_models import MeasuredCostModel, estimate_node_cost
from .cost_models.memory import graph_timeline, storage_owner, value_bytes
from .cost_models.wrapper_memory import returned_names, returned_strides, wrapper_timeline
from .errors import BudgetInfeasibleError, GraphoptError, PlanMismatchError, ReplanEarlierGraphs
from .ops.apply_update import APPLY_UPDATE, GraphParameters, GraphUpdates, OptimizerInBackward
from .ops.fsdp import ALL_GATHER
from .ops.offload import PREFETCH
from .passes import DECIDED, JOINT, SPLIT, PassRun, in_pipeline_order, run_stage
from .passes.hoist_prefetches import hoist_prefetches
from .passes.insert_updates import insert_updates
from .passes.lower_saves import LoweredSaves, lower_saves
from .passes.place_updates import place_updates
from .passes.prune_frozen import prune_frozen
from .passes.reorder_graph import reorder_graph
from .passes.shard_parameters import GraphSharding, shard_parameters
from .plan import Decision, GraphReordering, Plan, width_label
from .problem import DROP, KEEP, RECOMPUTE, Problem, Solution, action_error, check_actions, action_ms, memory_timeline, parse_action, redo_ms
from .solver import least_peak, solve
from .trainable import GraphTrainable

log = logging.getLogger("graphopt")

# How often the budget is tightened after simulating the split graphs.
MAX_REPAIR_ROUNDS = 6
# compiler="eager" runs the graphs op by op; plans are made for Inductor's kernels.
EAGER_MEMORY = (
    "compiler='eager' runs the graphs op by op, and the memory plan is Inductor's: a pointwise value the plan "
    "computes inside a kernel that reads it is stored instead, so the measured peak may exceed the predicted "
    "one; compile with compiler='inductor' for a budget that holds"
)
# Plans made for a graph that runs several times per step before its reserve for its
# earlier runs covers what they keep (`_plan_for_runs`).
MAX_RUN_ROUNDS = 6
# The reserve for earlier runs is tried this much above where the last plan's need and
# the reserve are estimated to meet, so that the estimate's plan fits beside it.
RUN_RESERVE_MARGIN = 0.02
# A fitting plan that leaves more of the usable budget than this unused is loosened.
SNUG_FRACTION = 0.02
# Program budgets tried, evenly spaced, before reporting that nothing fits.
SWEEP_POINTS = 8
# A solve started after the graph's planning time ran out still gets this long to find
# an incumbent (or fall back to the greedy plan).
MIN_SOLVE_S = 1.0
# A graph compiled at a graph break leaves the graphs after it the most room it can
# less this fraction of the usable budget, so that plans faster than the least-peak one
# the room is read from fit beside it (`_most_room`).
FIRST_STEP_MARGIN = 0.02
# The least share of the usable budget the graphs after such a graph must have left
# unused in the first step for graphopt.compile to plan and compile the step again.
FIRST_STEP_MIN_GAIN = 0.05


@dataclasses.dataclass
class PlanningClock:
    """What is left of one graph's planning time: ``Options.solver_time_limit_s`` bounds
    every solve of its repair rounds and sweep together, not each one."""

    limit_s: float
    started: float = dataclasses.field(default_factory=time.perf_counter)

    def left_s(self) -> float:
        return max(self.limit_s - (time.perf_counter() - self.started), 0.0)

    @property
    def expired(self) -> bool:
        return self.left_s() <= 0

    def solve_limit_s(self) -> float:
        return max(self.left_s(), MIN_SOLVE_S)

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.started


@dataclasses.dataclass(frozen=True)
class GivenPlan:
    """Decisions made elsewhere for one graph: decision key -> action (`decision_keys`).

    A plan torch's min-cut made is applied by running min-cut again on the same graph:
    its cut is more than the candidates it lists (it may save a tensor's view instead
    of the tensor), and min-cut is deterministic.

    A saved plan is `complete`: it lists every tensor of nonzero size the backward
    reads (or min-cut's cut takes), so one this graph has and the plan lacks means the
    plan was made for another graph (fewer layers). Decisions graphopt hands itself
    while composing a plan from fewer blocks may leave out tensors min-cut held through
    a view (``complete=False``): those are completed as the listed ones need.
    """

    actions: dict[str, str]
    by_min_cut: bool = False
    complete: bool = True


@dataclasses.dataclass
class Session:
    """One ``graphopt.compile`` call: its options, and what its graphs planned so far.

    Graph breaks give several joint graphs; tensors saved by earlier graphs stay alive
    while later graphs run, so each graph plans against what the earlier ones keep.
    Graphs are compiled one at a time, the first before the next is even traced: a graph
    Dynamo compiled at a graph break leaves the graphs after it the most room it can
    (`first_step_rooms`), and after the first step ``graphopt.compile`` plans the step
    again with what they left unused given back (`rooms_after_first_step`). When a later
    graph still cannot fit beside what the earlier ones keep, it asks (raising
    ``ReplanEarlierGraphs``) for the earlier graphs to be planned again, each leaving
    `room_after` its forward for what the later graphs need (``graphopt.compile`` does
    that and reruns the call). docs/design.md, "Graph breaks".
    """

    options: Options
    plans: list[Plan] = dataclasses.field(default_factory=list)
    saved_bytes: dict[str, int] = dataclasses.field(default_factory=dict)  # by graph name
    # Decisions to apply instead of solving, by graph name (a saved plan, or a plan
    # composed from fewer blocks).
    given: dict[str, GivenPlan] = dataclasses.field(default_factory=dict)
    # Graph name -> bytes later graphs need while its saved tensors wait for its backward.
    room_after: dict[str, int] = dataclasses.field(default_factory=dict)
    # Graph name -> the room a graph Dynamo compiled at a graph break left for the graphs
    # after it, not yet seen: the most it could (`_most_room`), so that the first step
    # fits whatever they need. `rooms_after_first_step` gives back what they left unused.
    first_step_rooms: dict[str, int] = dataclasses.field(default_factory=dict)
    # Graph name -> the Dynamo frame it was compiled for. A recompilation of a frame (a
    # new shape, a failed guard) gives a graph that runs instead of the earlier one, not
    # beside it -- unless a run of the earlier one still waits for its backward (a guard
    # that failed within the step: a block graph compiled again once its input requires
    # grad, the earlier version having run for the first block). `supersede` drops the
    # earlier one's bytes, or, while it has `pending` runs, keeps only theirs.
    frames: dict[str, object] = dataclasses.field(default_factory=dict)
    # Graph name -> its forward runs whose backward has not come (backend._once_per_backward).
    pending: dict[str, int] = dataclasses.field(default_factory=dict)
    # Each forward run whose backward has not come -> what closes it (backend._once_per_backward):
    # a call that fails drops its runs (``abandon_runs``), whose saved tensors go with it.
    open_runs: set[Callable[[], None]] = dataclasses.field(default_factory=set)
    handed_on: dict[str, int] = dataclasses.field(default_factory=dict)  # by graph name: what one run's forward keeps
    gradient_bytes: dict[str, int] = dataclasses.field(default_factory=dict)  # its parameters' gradients
    runs: dict[str, int] = dataclasses.field(default_factory=dict)  # by graph name: the runs it was planned for
    # Budgeted forwards run so far: graphopt.compile plans a call again (a size above a
    # symbolic graph's plan) only while none of that call has run.
    forward_runs: int = 0
    # torch's min-cut split of a joint graph, by the graph (``_min_cut``): a caller that
    # plans one traced step at many budgets (``graphopt plan``'s table) passes one memo to
    # all its sessions, so min-cut runs once per graph, not once per budget. None (a
    # compile, whose every graph is new): min-cut runs each time.
    min_cuts: dict[tuple, tuple[fx.GraphModule, fx.GraphModule]] | None = None
    _measured: MeasuredCostModel | None = None
    # optimizer=: parameter updates run inside the backward (ops/apply_update.py, passes/insert_updates.py)
    optimizer: OptimizerInBackward | None = dataclasses.field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.options.optimizer is not None:
            self.optimizer = OptimizerInBackward(self.options.optimizer, self.options.accumulation_steps)

    def graph_updates(self, joint, graph_parameters: GraphParameters | None) -> GraphUpdates:
        """The parameter updates of one graph's backward (none without optimizer=)."""
        if self.optimizer is None:
            return GraphUpdates({}, 0)
        return self.optimizer.updates_for(joint, graph_parameters)

    def abandon_runs(self, since: set[Callable[[], None]]) -> None:
        """Close the runs opened since `since` (the open runs before a call that raised):
        their saved tensors die with the call's exception, and no backward will come to
        close them."""
        for close in self.open_runs - since:
            close()

    def supersede(self, graph: str, frame: object) -> None:
        """`graph` is a new version of `frame` (Dynamo compiled it again: a new shape, a
        failed guard). An earlier version none of whose runs awaits its backward leaves
        the byte counts (it is replaced, or runs only at other shapes); its plan stays in
        `plans`. One whose runs still wait for their backward (a block graph compiled
        again for the next block) keeps what those runs keep, and no more: `graph` takes
        over its later runs."""
        for name, owner in list(self.frames.items()):
            if owner != frame or name == graph:
                continue
            done = self.pending.get(name, 0)
            if not done:
                for counts in (self.saved_bytes, self.gradient_bytes, self.frames, self.handed_on, self.runs):
                    counts.pop(name, None)
            elif done < self.runs.get(name, 1):
                self.saved_bytes[name] = done * self.handed_on.get(name, 0)
                self.gradient_bytes[name] = self.gradient_bytes.get(name, 0) * done // self.runs[name]
                self.runs[name] = done
        self.frames[graph] = frame

    def other_graphs(self, graph: str) -> list[str]:
        """The graphs recorded so far that run beside `graph`."""
        return [name for name in self.saved_bytes if name != graph]

    def other_graphs_bytes(self, graph: str, parameter_bytes: int) -> int:
        """What the other graphs keep, and the parameters only they read."""
        earlier = sum(self.saved_bytes[name] for name in self.other_graphs(graph))
        other_parameters = max(self.options.model_static_bytes - parameter_bytes, 0)
        return earlier + other_parameters

    def resident_gradient_bytes(self, graph: str, gradient_bytes: int) -> int:
        """The gradients alive from the step's start with accumulation (``.grad`` of every
        trainable parameter, from earlier micro-batches): the whole model's where
        ``graphopt.compile`` knows it, else this graph's and the other graphs' so far."""
        if not self.options.resident_gradients:
            return 0
        if self.options.model_gradient_bytes:
            return self.options.model_gradient_bytes
        return gradient_bytes + sum(self.gradient_bytes.get(name, 0) for name in self.other_graphs(graph))

    def later_gradient_bytes(self, graph: str, gradient_bytes: int) -> int:
        """The gradients graphs after `graph` in the step leave in ``.grad`` before its
        backward runs (their backwards come first): the model's trainable gradients less
        `graph`'s own (`gradient_bytes`, every run's) and those of the graphs recorded
        so far. Graphs not yet seen are counted as later ones: a first graph counts
        every other gradient, which it does hold through its backward, the step's last.
        0 where ``count_later_gradients`` is off, or with accumulation (every gradient
        is counted from the step's start)."""
        options = self.options
        if not options.count_later_gradients or options.resident_gradients or not options.model_gradient_bytes:
            return 0
        earlier = sum(self.gradient_bytes.get(name, 0) for name in self.other_graphs(graph))
        return max(options.model_gradient_bytes - gradient_bytes - earlier, 0)

    def replan_request(
        self, graph: str, analysis: Analysis, error: BudgetInfeasibleError
    ) -> GraphoptError:
        """What to raise when `graph` fits no plan: a request to replan the earlier
        graphs with room for it, or `error` itself when that cannot help (no earlier
        graph keeps anything, or they already leave that room)."""
        earlier = [name for name in self.other_graphs(graph) if self.saved_bytes[name] > 0]
        least = error.least_peak_bytes
        # What this graph needs beyond every parameter and what earlier graphs keep.
        need = least - analysis.extra_static_bytes - analysis.parameter_bytes
        room = dict(self.room_after)
        for name in earlier:
            room[name] = max(room.get(name, 0), need)
        if room == self.room_after:
            return error
        return ReplanEarlierGraphs(
            f"{graph} needs {format_bytes(need)} beside what {', '.join(earlier)} keep(s) for the backward; "
            "the earlier graphs must be planned again to leave that room. graphopt.compile does so and reruns "
            "the step; with torch.compile(backend='graphopt'), use graphopt.compile instead",
            room_after=room,
            graph=graph,
            need_bytes=need,
            cause=error,
        )

    def rooms_after_first_step(self) -> dict[str, int] | None:
        """After a first step whose graphs compiled at a graph break each left the most
        room they could for the graphs after them (`first_step_rooms`), the rooms to plan
        the step again with: each such graph gives up its share of what every graph after
        it left unused of the usable budget (its slack), so that the graphs after it fit
        beside what it then keeps -- with the plans they have, or faster ones. None while
        the first step's backward has not come or no graph after them was planned, when
        there is nothing to give back worth compiling the graphs again for
        (`FIRST_STEP_MIN_GAIN`), and once answered."""
        if not self.first_step_rooms or self.open_runs or not self.forward_runs:
            return None
        rooms = self.first_step_rooms
        # The plans of the graphs that run now (not those superseded), in the order planned.
        order = [plan for plan in self.plans if plan.graph in self.saved_bytes]
        positions = [index for index, plan in enumerate(order) if plan.graph in rooms]
        after_first = order[min(positions) + 1:] if positions else []
        if not after_first:  # no graph after them planned yet (a call that failed early)
            return None
        self.first_step_rooms = {}
        usable = _usable(self.options)
        slack = max(min(usable - plan.predicted_peak_bytes for plan in after_first), 0) // len(rooms)
        if slack <= FIRST_STEP_MIN_GAIN * usable:
            return None
        return {**self.room_after, **{graph: max(room - slack, 0) for graph, room in rooms.items()}}

    def node_cost(self) -> NodeCost:
        """How ops are priced: the roofline, or times measured on this machine (cached)."""
        if self.options.cost_model == "measured":
            if self._measured is None:
                self._measured = MeasuredCostModel(self.options.hardware)
            return self._measured.node_cost
        return functools.partial(estimate_node_cost, hardware=self.options.hardware)

    def record(
        self, plan: Plan, saved_bytes: int, gradient_bytes: int = 0, handed_on: int = 0, runs: int = 1
    ) -> None:
        """Record a planned graph, planned for `runs` runs (`saved_bytes` and
        `gradient_bytes` are all of theirs; `handed_on` is one run's)."""
        self.replace_plan(plan)
        self.saved_bytes[plan.graph] = saved_bytes
        self.handed_on[plan.graph] = handed_on
        self.gradient_bytes[plan.graph] = gradient_bytes
        self.runs[plan.graph] = runs

    def replace_plan(self, plan: Plan) -> None:
        """`plan` in place of its graph's plan (the byte counts stay)."""
        self.plans = [p for p in self.plans if p.graph != plan.graph] + [plan]

    def assume(self, assumption: str) -> None:
        """Something the whole step assumes, found after its graphs were planned: warned
        about once and listed in every plan's assumptions."""
        _warn_once(assumption)
        self.plans = [
            p if assumption in p.assumptions else dataclasses.replace(p, assumptions=(*p.assumptions, assumption))
            for p in self.plans
        ]


def partition(
    session: Session,
    graph_name: str,
    joint_module: fx.GraphModule,
    joint_inputs: Sequence[object],
    *,
    num_fwd_outputs: int,
    static_lifetime_input_indices: Sequence[int] | None = None,
    trainable: GraphTrainable | None = None,
    graph_parameters: GraphParameters | None = None,
    runs: int = 1,
    sharding: GraphSharding | None = None,
    at_graph_break: bool = False,
    **_: object,
) -> tuple[fx.GraphModule, fx.GraphModule]:
    """graphopt's partition function (the signature AOTAutograd and Inductor call).

    `trainable` (bound by the backend) says which parameter inputs train; the rest are
    pruned from the joint graph before it is analysed. `graph_parameters` (bound by the
    backend with optimizer=) says which inputs are parameters updated in the backward:
    their updates join the joint graph, and each split places them (`place_updates`).
    `sharding` (``graphopt plan --fsdp``, offline only) says which inputs are one FSDP2
    rank's parameter shards (`shard_parameters`). A graph Dynamo compiled `at_graph_break`
    runs before graphs it cannot see yet: unless the session already knows the room they
    need (`Session.room_after`), it leaves them the most it can (`_most_room`).
    """
    joint = torch_private.prepare_joint_graph(
        joint_module, num_fwd_outputs=num_fwd_outputs, static_lifetime_input_indices=static_lifetime_input_indices
    )
    options = session.options
    updates = session.graph_updates(joint, graph_parameters)
    pruning = None

    def prune(graph):
        nonlocal pruning
        if trainable is None or not trainable.rows:
            return None
        graph, pruning = prune_frozen(graph, trainable)
        return graph, f"{len(pruning.frozen_parameters)} frozen, {len(pruning.partial_parameters)} partly trained"

    def insert(graph):
        return (insert_updates(graph, updates), f"{len(updates.slots)} updates") if updates.slots else None

    def shard(graph):
        if sharding is None:
            return None
        graph, count = shard_parameters(graph, sharding)
        return graph, f"{count} parameters over {sharding.ranks} ranks"

    joint, joint_passes = run_stage(
        JOINT, joint, {"prune_frozen": prune, "insert_updates": insert, "shard_parameters": shard}, options.disabled_passes
    )
    if not torch_private.has_backward(joint) and not _updates(joint.module):  # pruning can leave no gradient
        return torch_private.default_partition(
            joint.module, joint_inputs, num_fwd_outputs=num_fwd_outputs,
            static_lifetime_input_indices=static_lifetime_input_indices,
        )
    frame = torch_private.current_frame_id()
    if frame is not None:
        session.supersede(graph_name, frame)
    gradients = _parameter_gradient_bytes(joint)
    resident = session.resident_gradient_bytes(graph_name, gradients)
    extra = session.other_graphs_bytes(graph_name, parameter_bytes(joint)) + updates.optimizer_state_bytes + resident
    # With optimizer= the updates consume gradients in the backward: none is left in .grad.
    later = session.later_gradient_bytes(graph_name, runs * gradients) if session.optimizer is None else 0
    analyses = []

    def analyze_with(reserved: int, room: int) -> Analysis:
        return analyze(
            joint,
            options.hardware,
            budget_bytes=options.memory_budget_bytes,
            extra_static_bytes=extra + reserved,
            node_cost=session.node_cost(),
            alternatives=alternative_settings(options),
            error_weight_ms=options.lossy_error_weight_ms,
            room_after_forward=room,
            later_gradients=later,
        )

    room = session.room_after.get(graph_name, 0)
    first_step = (
        at_graph_break and options.memory_budget_bytes is not None
        and graph_name not in session.room_after and graph_name not in session.given
    )
    if first_step:
        room = session.first_step_rooms[graph_name] = _most_room(joint, analyze_with, options)
        log.info("%s was compiled at a graph break, before the graphs after it: it leaves them %s, the most it can",
                 graph_name, format_bytes(room))

    def plan_with(reserved: int):
        analyses.append(analyze_with(reserved, room))
        return _plan_graph(session, graph_name, joint, joint_inputs, analyses[-1])

    usable = _usable(options) if options.memory_budget_bytes is not None else 0
    while True:
        try:
            reserved, (plan, forward, backward) = _plan_for_runs(plan_with, runs, usable)
            break
        except BudgetInfeasibleError as error:  # beside the last reserve for its earlier runs it tried
            if not first_step or not room:
                raise session.replan_request(graph_name, analyses[-1], error) from None
            # No plan found leaves that room: less by the least peak's excess, then none
            # (the later graphs may then ask for a replan).
            excess = error.least_peak_bytes - usable + int(FIRST_STEP_MARGIN * usable)
            room = session.first_step_rooms[graph_name] = max(room - excess, 0) if excess > 0 else 0
    if first_step and room:
        plan = dataclasses.replace(plan, assumptions=(*plan.assumptions, _first_step_assumption(graph_name, room)))
    plan = dataclasses.replace(plan, pruning=pruning, passes=in_pipeline_order(joint_passes + plan.passes))
    plan = _with_optimizer_memory(plan, updates)
    plan = _shown_apart(plan, "accumulated gradients", resident)
    plan = _shown_apart(plan, "its earlier runs", reserved)
    for kind, size in options.rank_reserves:  # DDP's buckets, FSDP2's reserves (graphopt/distributed.py)
        plan = _shown_apart(plan, kind, min(size, plan.memory["other graphs"]))
    # What the forward hands on (saved tensors and outputs), alive while later graphs run:
    # the end of the forward's timeline the plan was judged by.
    forward_steps = forward.meta[_TIMELINES][0]
    handed_on = forward_steps[-1] if forward_steps else 0
    session.record(plan, runs * handed_on, runs * gradients, handed_on, runs)
    if options.memory_budget_bytes is not None and not _predicted_from_code(forward):
        # The plan was judged in this order, which graphopt's simulation of the FX
        # graphs assumes; Inductor's own peak-memory reordering would move the peak
        # where the simulation cannot see it. A peak read from the code Inductor
        # generates already includes Inductor's reordering.
        torch_private.keep_order_through_inductor(forward)
        torch_private.keep_order_through_inductor(backward)
    log.info("%s", plan)
    return forward, backward


def _plan_for_runs(plan_with, runs: int, usable: int):
    """The plan of a graph that runs `runs` times before its first backward (a block
    compiled once and called once per block: a graph break in the loop over blocks, or
    per-block FSDP2), and the bytes it reserves for its earlier runs: (runs - 1) times
    what its forward hands on (its saved tensors and outputs), alive while the last run
    and the first backwards run. That depends on the plan, so plans are made until one
    fits beside the reserve it was made with: from no reserve, then where the last plan's
    need and the reserve are estimated to meet (`_next_reserve`); a reserve no plan fits
    beside is halved towards the last one that was too small.
    `plan_with(reserved)` plans with `reserved` more static memory and returns (plan,
    forward, backward); `BudgetInfeasibleError` when no plan is found to fit beside its
    reserve. `usable` is the part of the budget a predicted peak may fill.
    """
    if runs <= 1:
        return 0, plan_with(0)
    reserved, too_small, too_large = 0, 0, None
    error: BudgetInfeasibleError | None = None
    for _ in range(MAX_RUN_ROUNDS):
        try:
            result = plan_with(reserved)
        except BudgetInfeasibleError as failed:
            error, too_large = failed, reserved
            if reserved <= too_small:
                break
            reserved = (reserved + too_small) // 2
            continue
        forward_steps = result[1].meta[_TIMELINES][0]
        need = (runs - 1) * (forward_steps[-1] if forward_steps else 0)
        if need <= reserved:
            return reserved, result
        too_small = reserved
        reserved = _next_reserve(reserved, need, usable - result[0].predicted_peak_bytes, runs, too_large)
    if error is None:  # every round found a plan, each needing a larger reserve
        raise GraphoptError(
            f"a graph runs {runs} times before its first backward (one graph for {runs} blocks), and no plan found "
            f"fits beside what its earlier runs keep ({format_bytes(reserved)} asked for last); raise the budget, "
            "or shrink the batch"
        )
    raise error


def _next_reserve(reserved: int, need: int, slack: int, runs: int, too_large: int | None) -> int:
    """The reserve to try after a plan made beside `reserved` needed `need` > `reserved`
    for its earlier runs, leaving `slack` of the usable budget unused. Up to the slack
    more reserve leaves that plan as it is; past it, each byte more reserved is taken,
    at best, from what each run hands on, so the need falls by runs - 1 bytes per byte.
    The reserve is tried where that line meets the need, `RUN_RESERVE_MARGIN` above it
    (or at it) when that is below `too_large` (a reserve no plan fitted beside), else
    halfway to `too_large`."""
    unchanged = reserved + max(slack, 0)
    meet = need if need <= unchanged else (need + (runs - 1) * unchanged) / runs
    for guess in (int(meet * (1 + RUN_RESERVE_MARGIN)), int(meet)):
        guess = max(guess, reserved + 1)
        if too_large is None or guess < too_large:
            return guess
    return (reserved + too_large) // 2


def _plan_graph(session: Session, graph_name: str, joint, joint_inputs, analysis: Analysis):
    """The plan for one analysed joint graph, and its split (forward, backward)."""
    options = session.options
    given = session.given.get(graph_name)
    # Every split is reordered (with reorder=True) before it is judged: a plan fits when
    # its final graphs do.
    started = time.perf_counter()
    if given is not None and not given.by_min_cut:
        solution, forward, backward, predicted_peak = _apply_given(joint, analysis, given, graph_name, options)
    else:
        solution, forward, backward, predicted_peak = _torch_default(joint, joint_inputs, analysis, options, session.min_cuts)
        if given is not None:
            _check_min_cut_given(analysis, given, solution.actions, graph_name)
    _progress(options, "%s: %s predicts a peak of %s (usable budget %s)", graph_name,
              "the given plan" if given is not None else "torch's min-cut", format_bytes(predicted_peak),
              format_bytes(_usable(options)) if options.memory_budget_bytes is not None else "none")
    assumptions = cost_assumptions(analysis.candidate_nodes, session.node_cost())
    if options.compiler == "eager" and options.memory_budget_bytes is not None:
        assumptions.append(EAGER_MEMORY)
    if given is not None:
        assumptions += _check_given_budget(analysis, options, predicted_peak, graph_name)
    roofline = analysis  # its prices, before min-cut's recomputations count as free
    clock = PlanningClock(options.solver_time_limit_s)
    if given is None and _policy_demands_offload(analysis):  # min-cut ignores the user's offload tags
        solution, forward, backward, predicted_peak = _solve_without_budget(joint, analysis, options, clock)
    if given is None and options.memory_budget_bytes is not None and predicted_peak > _usable(options):
        analysis = _count_input_copies(analysis, forward.meta.get(_INPUT_COPIES, {}))
        analysis = _learn_from_min_cut(analysis, solution)
        solution, forward, backward, predicted_peak = _solve_and_split(joint, analysis, options, solution, predicted_peak, clock)
    reordering = forward.meta.get(_REORDERING, ())
    plan = build_plan(
        joint, options, graph_name, analysis, solution, predicted_peak, forward, backward, reordering,
        roofline=roofline, assumptions=assumptions,
    )
    for assumption in plan.assumptions:
        _warn_once(assumption)
    _progress(options, "%s: %s, predicted peak %s, added %.2f ms; planned in %.2f s", graph_name, plan.method,
              format_bytes(predicted_peak), plan.predicted_added_ms, time.perf_counter() - started)
    return plan, forward, backward


def _progress(options: Options, message: str, *args: object) -> None:
    """A line of planning progress: printed to stderr with verbose=True, else logged at INFO."""
    if options.verbose:
        print(f"graphopt: {message % args}", file=sys.stderr, flush=True)
    else:
        log.info(message, *args)


@functools.cache
def _warn_once(assumption: str) -> None:
    """Say what graphopt assumed, once per process; each plan lists it again (`Plan.assumptions`)."""
    log.warning("graphopt assumed: %s", assumption)


def cost_assumptions(nodes: Sequence[fx.Node], node_cost: NodeCost) -> list[str]:
    """What pricing `nodes` (the candidates' producers, priced for recomputation) assumed,
    each distinct assumption once."""
    assumed = (node_cost(node).assumption for node in nodes if node.op == "call_function")
    return list(dict.fromkeys(assumption for assumption in assumed if assumption))


def _torch_default(joint, joint_inputs, analysis: Analysis, options: Options, memo: dict | None):
    """torch's own min-cut, described as a plan.

    It is the fastest cut torch knows (it also weighs fusion, which our cost model does
    not), so whenever it fits the budget graphopt takes it and adds no time.
    """
    # Min-cut neither offloads nor quantizes: the decided stage has nothing to lower.
    _, decided_runs = run_stage(DECIDED, None, {"lower_saves": lambda graph: None}, options.disabled_passes)
    forward, backward = _split_passes(joint, analysis, options, _min_cut(joint, joint_inputs, memo), decided_runs)
    saved = {n.name for n in backward.graph.find_nodes(op="placeholder")}
    recomputed = {n.name for n in backward.graph.nodes if n.op == "call_function"}
    actions = tuple(
        KEEP if node.name in saved else RECOMPUTE if node.name in recomputed else DROP
        for node in analysis.candidate_nodes
    )
    timeline = memory_timeline(analysis.problem, actions)
    added_ms = sum(c.recompute_ms for c, a in zip(analysis.problem.candidates, actions) if a == RECOMPUTE)
    solution = Solution(actions, max(timeline), added_ms, "torch-min-cut")
    return solution, forward, backward, _simulate(joint, analysis, forward, backward, options)


def _min_cut(joint, joint_inputs, memo: dict | None) -> tuple[fx.GraphModule, fx.GraphModule]:
    """torch's min-cut split of the joint graph, from `memo` when it holds the same graph
    (its code, and its inputs' sizes, strides, dtypes and fake mode): min-cut takes
    seconds on a large graph (7.8 s on the LLaMA-7B shape), and a table plans one graph
    at every budget. Each call gets its own copy: the passes after the split rewrite it."""
    if memo is None:
        return torch_private.min_cut_partition(joint, joint_inputs)
    placeholders = joint.module.graph.find_nodes(op="placeholder")
    layouts = tuple(_layout(node.meta.get("val")) for node in placeholders)
    key = (joint.module.code, layouts, joint.num_fwd_outputs)
    if key not in memo:
        memo[key] = torch_private.min_cut_partition(joint, joint_inputs)
    copies = []
    for graph_module in memo[key]:
        copy, _ = torch_private.copy_graph_module(graph_module)
        copy.meta.update(graph_module.meta)
        copies.append(copy)
    return tuple(copies)


def _layout(value: object) -> object:
    if isinstance(value, torch.Tensor):  # a fake tensor's mode too: the split's tensors belong to it
        return (str(value.shape), str(value.stride()), value.dtype, str(value.device), id(getattr(value, "fake_mode", None)))
    return str(value)


def _apply_given(joint, analysis: Analysis, given: GivenPlan, graph_name: str, options: Options):
    """The split for decisions made elsewhere (a saved plan), matched by decision key.

    The given plan lists the tensors of nonzero size it keeps or recomputes; every
    other candidate is dropped unless the backward or a recomputed tensor needs it.
    Then it is kept if it can be: a zero-size output costs nothing, and a tensor torch's
    min-cut saved through a view of it is held by that view anyway (the simulation
    counts one storage). A view, which cannot be kept, is recomputed from its base. A key
    this graph lacks, or (in a complete plan) a tensor of nonzero size the graph needs
    and the plan does not list, means the plan was made for another graph: that is an
    error, not a guess (`_check_given_keys`).
    """
    keys = decision_keys(analysis.candidate_nodes)
    candidates = analysis.problem.candidates
    needed_keys = [key for key, c in zip(keys, candidates) if c.needed_by_backward and c.size_bytes > 0]
    _check_given_keys(keys, given, needed_keys, graph_name)
    actions: list[str | None] = [given.actions.get(key) for key in keys]
    needed = [c.needed_by_backward for c in candidates]
    for index in range(len(candidates) - 1, -1, -1):  # readers come after what they read
        if actions[index] is None and needed[index] and given.complete and candidates[index].size_bytes > 0:
            raise PlanMismatchError(
                f"the given plan does not match {graph_name}: it recomputes from {keys[index]!r} and has no decision "
                "for it; was it made for another model? Plan again for this one"
            )
        if actions[index] is None:
            actions[index] = _completed_action(candidates[index], needed[index], actions)
        if actions[index] == RECOMPUTE:
            for source in candidates[index].inputs:
                needed[source] = True
    for candidate, action in zip(candidates, actions):
        if action == RECOMPUTE and not candidate.can_recompute:
            raise PlanMismatchError(f"the given plan recomputes {candidate.name} in {graph_name}, which cannot be recomputed")
        if action not in (KEEP, RECOMPUTE, DROP) and candidate.alternative(action) is None:
            raise PlanMismatchError(
                f"the given plan says {action} for {candidate.name} in {graph_name}, which these options do not allow; "
                "pass the allow_lossy / quantize_bits / hardware it was made with"
            )
    added_ms = sum(action_ms(c, a) for c, a in zip(candidates, actions))
    error = sum(action_error(c, a) for c, a in zip(candidates, actions))
    solution = Solution(tuple(actions), max(memory_timeline(analysis.problem, actions)), added_ms, "given plan", error=error)
    forward, backward, predicted_peak = _split_and_simulate(joint, analysis, solution, options)
    return solution, forward, backward, predicted_peak


def _completed_action(candidate, needed: bool, actions: Sequence[str | None]) -> str:
    """The action for a candidate a given plan does not list (a zero-size view, or one
    min-cut held through a view): dropped unless needed; a view of a recomputed tensor
    is recomputed with it, as the program does (keeping the view would hold the
    tensor's storage from the forward on); otherwise kept where it can be."""
    if not needed:
        return DROP
    if candidate.storage_of is not None and actions[candidate.storage_of] == RECOMPUTE and candidate.can_recompute:
        return RECOMPUTE
    return KEEP if candidate.can_keep else RECOMPUTE


_PLAN_AGAIN = "Plan again for this model and these inputs (graphopt plan --json, or graphopt.compile without plan=)"


def _check_given_keys(keys: Sequence[str], given: GivenPlan, required: Sequence[str], graph_name: str) -> None:
    """Raise PlanMismatchError saying how a given plan and this graph (its candidates'
    decision `keys`) differ: decisions for tensors the graph lacks or has with another
    dtype or shape, or, in a complete plan, `required` tensors it has no decision for."""
    present = set(keys)
    unknown = [key for key in given.actions if key not in present]
    here = {key_tensor(key): key for key in keys}
    changed = [(key, here[key_tensor(key)]) for key in unknown if key_tensor(key) in here]
    if changed:
        saved, current = changed[0]
        raise PlanMismatchError(
            f"the given plan does not match {graph_name}: it was made for other shapes or dtypes ({len(changed)} of its "
            f"{len(given.actions)} decisions differ; {key_tensor(saved)!r} is {key_value(saved)} in the plan and "
            f"{key_value(current)} here). {_PLAN_AGAIN}"
        )
    if unknown:
        raise PlanMismatchError(
            f"the given plan does not match {graph_name}: {len(unknown)} of its {len(given.actions)} decisions name "
            f"tensors this graph does not have (first: {unknown[0]!r}); was it made for another model? {_PLAN_AGAIN}"
        )
    missing = [key for key in required if key not in given.actions] if given.complete else []
    if missing:
        raise PlanMismatchError(
            f"the given plan does not match {graph_name}: it has no decision for {len(missing)} of the {len(required)} "
            f"tensors this graph's backward needs (first: {missing[0]!r}); was it made for a smaller model (fewer "
            f"layers)? {_PLAN_AGAIN}"
        )


def _check_min_cut_given(analysis: Analysis, given: GivenPlan, min_cut_actions: Sequence[str], graph_name: str) -> None:
    """A plan torch's min-cut made is applied by min-cut again; it must list this graph's
    tensors and every tensor of nonzero size min-cut keeps or recomputes here."""
    keys = decision_keys(analysis.candidate_nodes)
    cut = [
        key for key, candidate, action in zip(keys, analysis.problem.candidates, min_cut_actions)
        if action != DROP and candidate.size_bytes > 0
    ]
    _check_given_keys(keys, given, cut, graph_name)


def _check_given_budget(analysis: Analysis, options: Options, predicted_peak: int, graph_name: str) -> list[str]:
    """A given plan is judged as a solved one is: over the usable budget it raises
    BudgetInfeasibleError, unless check_budget=False, when the plan says it went over."""
    if options.memory_budget_bytes is None or predicted_peak <= _usable(options):
        return []
    over = (
        f"the given plan's predicted peak on {graph_name} is {format_bytes(predicted_peak)}, over the "
        f"{format_bytes(_usable(options))} that memory_budget={format_bytes(options.memory_budget_bytes)} leaves after "
        f"the {options.prediction_headroom:.0%} headroom graphopt keeps for its prediction error"
    )
    if not options.check_budget:
        return [f"{over}; applied anyway (check_budget=False)"]
    least_budget = least_budget_shown(predicted_peak / (1 - options.prediction_headroom))
    breakdown = _memory_no_decision_changes(analysis, gradients=False)
    breakdown["activations, gradients and temporaries"] = predicted_peak - sum(breakdown.values())
    raise BudgetInfeasibleError(
        f"{over}. Plan again for this budget (graphopt.compile without plan=), raise the budget to at least "
        f"{format_bytes(least_budget)}, or pass check_budget=False to apply the plan anyway",
        least_peak_bytes=predicted_peak,
        least_budget_bytes=least_budget,
        breakdown=breakdown,
    )


def _with_optimizer_memory(plan: Plan, updates: GraphUpdates) -> Plan:
    """The plan's static memory with optimizer=: the optimizer state, planned as memory
    outside this graph like the other graphs', shown on its own. (The gradients the
    updates consume are no backward outputs, so "gradients" no longer counts them.)"""
    if not updates.optimizer_state_bytes:
        return plan
    memory = dict(plan.memory)
    memory["other graphs"] -= updates.optimizer_state_bytes
    memory["optimizer state"] = updates.optimizer_state_bytes
    return dataclasses.replace(plan, memory=memory)


def _shown_apart(plan: Plan, line: str, size: int) -> Plan:
    """The plan's memory with `size` bytes of its "other graphs" line shown on a line of
    their own: the gradients earlier micro-batches left in ``.grad`` ("accumulated
    gradients"), what the graph's earlier runs in the step keep ("its earlier runs"),
    what a data-parallel rank holds beside its graphs ("DDP gradient buckets", ...)."""
    if not size:
        return plan
    memory = dict(plan.memory)
    memory["other graphs"] -= size
    memory[line] = size
    return dataclasses.replace(plan, memory=memory)


def _parameter_gradient_bytes(joint) -> int:
    """Bytes of the gradients the backward computes for the graph's parameters (its
    static-lifetime inputs): what ``.grad`` holds after it, or, with optimizer=, what the
    updates inside it consume."""
    outputs = list(joint.module.graph.output_node().args[0])
    gradients = outputs[len(outputs) - len(joint.primals):]
    updated = {update.args[0] for update in _updates(joint.module)}
    return sum(
        value_bytes(primal.meta.get("val"))
        for primal, gradient in zip(joint.primals, gradients)
        if (gradient is not None or primal in updated) and primal in joint.static_inputs
    )


def _updates(graph_module: fx.GraphModule) -> list[fx.Node]:
    """The optimizer updates in a graph (``optimizer=``; passes/insert_updates.py)."""
    return graph_module.graph.find_nodes(op="call_function", target=APPLY_UPDATE)


def _count_input_copies(analysis: Analysis, copies: dict[str, int]) -> Analysis:
    """The program, told of the graph inputs Inductor's forward copies and saves in their
    place (`_INPUT_COPIES`): each copy is made as the forward starts and held until the
    backward's last read of the input. Nothing the plan decides changes them."""
    if not copies:
        return analysis
    problem, timeline = analysis.problem, analysis.timeline_nodes
    changes = [0] * (problem.num_steps + 1)
    for name, size in copies.items():
        reads = [step for step, node in enumerate(timeline) if any(storage_owner(source).name == name for source in node.all_input_nodes)]
        last = max(reads + [problem.num_forward_steps - 1])
        changes[0] += size
        changes[last + 1] -= size
    base, running = [], 0
    for held, change in zip(problem.base_bytes, changes):
        running += change
        base.append(held + running)
    return dataclasses.replace(analysis, problem=dataclasses.replace(problem, base_bytes=tuple(base)))


def _learn_from_min_cut(analysis: Analysis, min_cut: Solution) -> Analysis:
    """Price at zero what torch's min-cut recomputes.

    Min-cut recomputes only what fuses into the backward's kernels for free; our
    roofline cannot see fusion and would price it above zero. Starting from min-cut's
    judgement, the program reproduces its cut when the budget allows and adds
    recomputation only where the budget needs it.
    """
    candidates = tuple(
        dataclasses.replace(candidate, recompute_ms=0.0) if action == RECOMPUTE else candidate
        for candidate, action in zip(analysis.problem.candidates, min_cut.actions)
    )
    return dataclasses.replace(analysis, problem=dataclasses.replace(analysis.problem, candidates=candidates))


def _solve_and_split(joint, analysis: Analysis, options: Options, default: Solution, default_peak: int, clock: PlanningClock):
    """Solve, split, simulate; move the program's budget until the simulation fits snugly.

    The program's memory model is approximate (see docs/design.md) in both directions;
    the simulation of the real split graphs is the judge. Each round shifts the
    program's budget by the simulation's distance from the usable budget: down when a
    plan overshoots, up when it leaves more than `SNUG_FRACTION` unused (a looser plan
    recomputes less); once one target fits and another overshoots, a shift that leaves
    the interval between them bisects it. The fastest plan that fits wins.
    `default` is torch's min-cut plan and `default_peak` its simulated peak, the first
    point of reference. The rounds stop when `clock` runs out and a plan fits. Each
    least-peak solve is bounded by the plan of least program peak seen so far, so a solve
    the clock cuts short never answers with a higher floor than one already found.
    """
    problem = analysis.problem
    budget = _usable(options)
    target, least, best = budget, default_peak, None
    fits, overshoots = None, None  # the highest target whose plan fit, the lowest whose did not
    tried, floor_tried, floor = {budget}, False, None
    # The plan of least program peak so far; min-cut's, where the program can express it
    # (it may save what the program only recomputes, e.g. a BatchNorm's statistics).
    lowest, lowest_peak = None, None
    if not check_actions(problem, default.actions):
        lowest, lowest_peak = default.actions, max(memory_timeline(problem, default.actions))
    for round_number in range(1, MAX_REPAIR_ROUNDS + 1):
        if clock.expired and best is not None:
            break
        solution = solve(dataclasses.replace(problem, budget_bytes=target), time_limit_s=clock.solve_limit_s(), start=lowest)
        if solution is None:  # below the model's least peak, which is conservative: try that plan
            if floor_tried:
                break  # lower targets all give that plan again
            floor_tried = True
            solution = floor = least_peak(problem, time_limit_s=clock.solve_limit_s(), start=lowest)
        if lowest_peak is None or solution.peak_bytes < lowest_peak:
            lowest, lowest_peak = solution.actions, solution.peak_bytes
        forward, backward, predicted_peak = _split_and_simulate(joint, analysis, solution, options)
        _progress(options, "round %d: program budget %s -> %s plan, simulated peak %s (%s the usable %s), added %.2f ms; "
                  "%.1f s so far", round_number, format_bytes(target), solution.method, format_bytes(predicted_peak),
                  "within" if predicted_peak <= budget else "over", format_bytes(budget), solution.added_ms, clock.elapsed_s())
        least = min(least, predicted_peak)
        if predicted_peak <= budget:
            if best is None or solution.added_ms < best[0].added_ms:
                best = (solution, forward, backward, predicted_peak)
            if budget - predicted_peak <= SNUG_FRACTION * budget:
                break
            fits = target if fits is None else max(fits, target)
        else:
            overshoots = target if overshoots is None else min(overshoots, target)
        shifted = min(target, solution.peak_bytes) + (budget - predicted_peak)
        if fits is not None and overshoots is not None and (shifted in tried or not fits < shifted < overshoots):
            # The program's error jumps between these targets (plans differ in kind, not
            # degree): halve the interval instead.
            shifted = (fits + overshoots) // 2
        if shifted in tried:
            break  # a target already planned: the rounds would cycle
        tried.add(shifted)
        target = shifted
        _progress(options, "simulated peak %s for a usable %s; replanning for %s", format_bytes(predicted_peak), format_bytes(budget), format_bytes(target))
    if best is not None:
        return best
    return _sweep(joint, analysis, options, least, clock, lowest, floor)


def _sweep(
    joint, analysis: Analysis, options: Options, least_seen: int, clock: PlanningClock,
    start: Sequence[str] | None, floor: Solution | None,
):
    """Last resort before giving up: plans for program budgets from the model's least
    peak up to the default's, each simulated. The first that fits is used; otherwise
    the least simulated peak is what the error reports, so that number is reachable.
    Once `clock` has run out only the least-peak plan is judged. `floor`, the
    least-peak plan where the rounds already solved and simulated it, is not redone."""
    problem, budget = analysis.problem, _usable(options)
    judged = floor is not None
    if floor is None:
        floor = least_peak(problem, time_limit_s=clock.solve_limit_s(), start=start)
    best_solution, least = floor, least_seen
    for step in range(SWEEP_POINTS):
        if step and clock.expired:
            break
        if step == 0 and judged:
            continue  # over the budget, and counted in `least_seen`
        target = floor.peak_bytes + (least_seen - floor.peak_bytes) * step // SWEEP_POINTS
        program = dataclasses.replace(problem, budget_bytes=target)
        solution = floor if step == 0 else solve(program, time_limit_s=clock.solve_limit_s(), start=floor.actions)
        if solution is None:
            continue
        forward, backward, predicted_peak = _split_and_simulate(joint, analysis, solution, options)
        _progress(options, "sweep %d/%d: program budget %s -> simulated peak %s (%s the usable %s); %.1f s so far", step + 1,
                  SWEEP_POINTS, format_bytes(target), format_bytes(predicted_peak),
                  "within" if predicted_peak <= budget else "over", format_bytes(budget), clock.elapsed_s())
        if predicted_peak <= budget:
            return solution, forward, backward, predicted_peak
        if predicted_peak < least:
            best_solution, least = solution, predicted_peak
    raise _infeasible(analysis, options, least, best_solution, timed_out=clock.expired)


def _most_room(joint, analyze_with: Callable[[int, int], Analysis], options: Options) -> int:
    """The most room a graph can leave after its forward for graphs it cannot see yet.
    With twice the usable budget as room the end of the forward is the peak, so the plan
    of least peak there hands on the fewest bytes the program finds; its simulated peak
    says how much of that room fits, less `FIRST_STEP_MARGIN` of the usable budget (the
    plan then made with the room is judged by the simulation too). One least-peak solve."""
    usable = _usable(options)
    probe = 2 * usable
    analysis = analyze_with(0, probe)
    least = least_peak(analysis.problem, time_limit_s=options.solver_time_limit_s)
    _, _, simulated = _split_and_simulate(joint, analysis, least, options)
    return max(probe - (simulated - usable) - int(FIRST_STEP_MARGIN * usable), 0)


def _first_step_assumption(graph_name: str, room: int) -> str:
    """What a graph compiled at a graph break assumes of the graphs after it."""
    return (
        f"{graph_name} was compiled at a graph break, before the graphs after it were seen: it leaves them "
        f"{format_bytes(room)} after its forward, the most it can, so that the first step fits whatever they need. "
        "graphopt.compile plans the step again once it has run, giving the graphs at a break the room the later "
        "graphs left unused; torch.compile(backend='graphopt') keeps this plan"
    )


def _usable(options: Options) -> int:
    """The part of the budget a simulated peak may fill."""
    return int(options.memory_budget_bytes * (1 - options.prediction_headroom))


def alternative_settings(options: Options) -> AlternativeSettings:
    """The offload / quantize choices the options allow: lossy widths only when the user
    opted in; offload only where a host link can pay (not on a CPU)."""
    if "lower_saves" in options.disabled_passes:  # the pass that carries both out
        return AlternativeSettings(quantize_bits=(), offload=False)
    offload = options.hardware is not None and options.hardware.device_type != "cpu"
    return AlternativeSettings(quantize_bits=options.quantize_bits, offload=offload)


def _policy_demands_offload(analysis: Analysis) -> bool:
    """A user's MUST_CPU_OFFLOAD tag left offloading as a tensor's only choice. torch's
    min-cut ignores such tags, so the fastest plan that honours them replaces it as the
    reference the budget is checked against."""
    return any(c.alternatives and not c.can_keep and not c.can_recompute for c in analysis.problem.candidates)


def _solve_without_budget(joint, analysis: Analysis, options: Options, clock: PlanningClock):
    """The fastest plan that honours the user's constraints, whatever its peak."""
    unbounded = sum(analysis.problem.base_bytes) + sum(c.size_bytes for c in analysis.problem.candidates)
    problem = dataclasses.replace(analysis.problem, budget_bytes=max(analysis.problem.base_bytes) + unbounded)
    solution = solve(problem, time_limit_s=clock.solve_limit_s())
    assert solution is not None, "a budget above every tensor together always fits"
    return solution, *_split_and_simulate(joint, analysis, solution, options)


def _split_and_simulate(joint, analysis: Analysis, solution: Solution, options: Options):
    """The split the solution makes of `joint`, through the pipeline's decided and split
    stages (graphopt/passes/), and its simulated peak. The passes that ran are kept in
    the forward's meta (`_PASSES`) for the plan."""
    saved = saved_nodes(joint, analysis, solution.actions)
    lossy = [action for action in solution.actions if action not in (KEEP, RECOMPUTE, DROP)]
    if lossy and "lower_saves" in options.disabled_passes:
        raise GraphoptError(
            f"the plan offloads or quantizes {len(lossy)} tensor(s) (a saved plan, or the model's own offload "
            "tags), and disable_passes names lower_saves, which carries that out"
        )

    def lower(decided: LoweredSaves):
        if not lossy:
            return None
        lowered = lower_saves(joint, saved, analysis.candidate_nodes, solution.actions, host_is_device=analysis.host_is_device)
        return lowered, f"{lowered.lowered} offloaded or quantized"

    decided, decided_runs = run_stage(
        DECIDED, LoweredSaves(joint.module, saved, 0), {"lower_saves": lower}, options.disabled_passes
    )
    split = torch_private.split_joint_graph(joint, decided.saved, decided.module)
    forward, backward = _split_passes(joint, analysis, options, split, decided_runs)
    return forward, backward, _simulate(joint, analysis, forward, backward, options)


def _split_passes(joint, analysis: Analysis, options: Options, split, decided_runs: tuple[PassRun, ...] = ()):
    """The split stage of the pipeline on a split (forward, backward), after the decided
    stage's `decided_runs`. The runs of both stages are kept in the forward's meta
    (`_PASSES`) for the plan."""

    def hoist(split):
        forward, backward = split
        if not backward.graph.find_nodes(op="call_function", target=PREFETCH):
            return None
        node_ms = lambda node: estimate_node_cost(node, options.hardware).ms  # noqa: E731
        owned = _backward_owned_inputs(analysis, backward)
        timeline = lambda graph_module: graph_timeline(graph_module, owned)  # noqa: E731
        moved = hoist_prefetches(backward, node_ms, options.hardware.host_link_bytes_per_s, timeline)
        if moved:
            # Inductor's peak-memory reordering would sink the early copies back to their use.
            torch_private.keep_order_through_inductor(backward)
        return split, f"{moved} moved"

    def place(split):
        forward, backward = split
        if not _updates(backward):
            return None
        return (forward, place_updates(backward, joint)), ""

    def reorder(split):
        if not options.reorder:
            return None
        reordering = _reorder(analysis, *split)
        saved_bytes = sum(r.peak_before_bytes - r.peak_after_bytes for r in reordering)
        return split, f"saves {format_bytes(saved_bytes)}"

    (forward, backward), split_runs = run_stage(
        SPLIT, split, {"hoist_prefetches": hoist, "place_updates": place, "reorder_graph": reorder}, options.disabled_passes
    )
    forward.meta[_PASSES] = (*decided_runs, *split_runs)
    return forward, backward


_PASSES = "graphopt_passes"  # forward.meta key: the decided and split stages' runs (passes.PassRun)


def _simulate(joint, analysis: Analysis, forward: fx.GraphModule, backward: fx.GraphModule, options: Options) -> int:
    """Peak of the real split graphs, freed as Inductor frees them."""
    return max(_simulated_timeline(joint, analysis, forward, backward, options))


def _simulated_timeline(joint, analysis: Analysis, forward: fx.GraphModule, backward: fx.GraphModule, options: Options) -> list[int]:
    """Bytes in use after each step of the forward, then of the backward, static included."""
    static = analysis.static_bytes + analysis.extra_static_bytes
    forward_steps, backward_steps = _graph_timelines(joint, analysis, forward, backward, options)
    forward_steps = list(forward_steps)
    if analysis.room_after_forward and forward_steps:  # later graphs run beside what it keeps
        forward_steps.append(forward_steps[-1] + analysis.room_after_forward)
    steps = forward_steps + [live + analysis.later_gradients for live in backward_steps]
    return [static + live for live in steps] or [static]


_TIMELINES = "graphopt_timelines"  # forward.meta key: both graphs' timelines, once computed
_FROM_CODE = "graphopt_timelines_from_code"  # forward.meta key: whether Inductor's code gave them


def _graph_timelines(joint, analysis: Analysis, forward: fx.GraphModule, backward: fx.GraphModule, options: Options):
    """Bytes each graph holds after each of its steps (its own buffers and the inputs it
    owns). With Inductor, from the wrapper code Inductor generates for the graphs
    (statements); otherwise, or where that fails, graphopt's simulation of the FX graphs
    (nodes, ``graph_timeline``)."""
    cached = forward.meta.get(_TIMELINES)
    if cached is not None:
        return cached
    owned = _backward_owned_inputs(analysis, backward)
    timelines = None
    if options.compiler == "inductor" and options.prediction == "code":
        timelines = _inductor_timelines(joint, forward, backward, owned, getattr(options.hardware, "device_type", None))
    forward.meta[_FROM_CODE] = timelines is not None
    if timelines is None:
        timelines = (graph_timeline(forward), graph_timeline(backward, owned))
    forward.meta[_TIMELINES] = timelines
    return timelines


def _inductor_timelines(joint, forward: fx.GraphModule, backward: fx.GraphModule, owned: dict, target: str | None):
    """Both graphs' timelines replayed from the wrapper code Inductor generates for them
    (no kernel is compiled), or None where Inductor cannot generate it here; the plan
    then lists the fallback among its assumptions (``forward.meta[_PREDICTION_FALLBACK]``).
    `target`: the device type planned for; extern calls are run here to measure their
    scratch only when the graph's tensors are on it (not a GPU plan traced on the CPU)."""
    try:
        donated = torch_private.backward_donated_inputs(forward, backward, joint.num_fwd_outputs)
        device = _device_type(forward)
        probe = device == target
        code = torch_private.generate_wrapper_code(forward)
        forward_steps = wrapper_timeline(code.source, code.buffer_bytes, {}, code.strides, code.shapes, device, code.dtypes, probe)
        forward.meta[_INPUT_COPIES] = _input_copies(forward, code)
        owned = _owned_as_returned(forward, code, owned)
        strides = _saved_strides(forward, code)
        # A saved view holds the whole buffer the forward returned it from.
        sizes = {placeholder: code.buffer_bytes[key] for placeholder, key in owned.items() if key in code.buffer_bytes}
        code = torch_private.generate_wrapper_code(backward, donated, is_backward=True, input_strides=strides)
        sizes = {**code.buffer_bytes, **{name: max(size, code.buffer_bytes.get(name, 0)) for name, size in sizes.items()}}
        return forward_steps, wrapper_timeline(code.source, sizes, owned, code.strides, code.shapes, device, code.dtypes, probe)
    except Exception as error:  # noqa: BLE001 - any failure falls back to the simulation, which the plan says
        forward.meta[_PREDICTION_FALLBACK] = (
            f"the peak is predicted by graphopt's simulation of the graphs, which has been off by up to 5% on "
            f"recompute-heavy plans: Inductor's generated code could not be read ({type(error).__name__}: "
            f"{str(error)[:_REASON_CHARS]})"
        )
        return None


_PREDICTION_FALLBACK = "graphopt_prediction_fallback"  # forward.meta key: why the simulation predicted the peak


def _predicted_from_code(forward: fx.GraphModule) -> bool:
    """Whether the split's peak was read from the code Inductor generates for it."""
    return forward.meta.get(_FROM_CODE, False)
_INPUT_COPIES = "graphopt_input_copies"  # forward.meta key: {graph input name: bytes of Inductor's copy}


def _device_type(graph_module: fx.GraphModule) -> str:
    """The device type of the graph's first tensor input (its extern kernels run there)."""
    for node in graph_module.graph.find_nodes(op="placeholder"):
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor):
            return value.device.type
    return "cpu"


def _owned_as_returned(forward: fx.GraphModule, code: torch_private.WrapperCode, owned: dict[str, object]) -> dict[str, object]:
    """The backward's owned inputs keyed by the buffer the forward's code returns for
    each: saved tensors share a storage exactly when Inductor returns one buffer for them
    (q, k and v may be views of one projection in the graph and three buffers in the
    code), one the forward copied a graph input into is owned, and one the code returns
    as a graph input (or a view of it) is that input's memory, counted already."""
    inputs = {node.name for node in forward.graph.find_nodes(op="placeholder")}
    owned = dict(owned)
    for node, name in zip(forward.graph.output_node().args[0], returned_names(code.source)):
        if not isinstance(node, fx.Node) or name is None:
            continue
        if name in inputs:
            owned.pop(node.name, None)
        else:
            owned[node.name] = name
    return owned


def _saved_strides(forward: fx.GraphModule, code: torch_private.WrapperCode) -> dict[str, tuple[int, ...]]:
    """The strides of the forward's outputs as its generated code returns them, by the
    name the backward's placeholder for each has: the layout the backward is compiled for."""
    outputs = forward.graph.output_node().args[0]
    return {
        node.name: stride
        for node, stride in zip(outputs, returned_strides(code.source, code.strides))
        if isinstance(node, fx.Node) and stride is not None
    }


def _input_copies(forward: fx.GraphModule, code: torch_private.WrapperCode) -> dict[str, int]:
    """Graph inputs the forward saves for the backward that Inductor's code returns as a
    copy, by name, with the copy's bytes: a layout Inductor chose for them (a CPU
    convolution's weights and images, converted to channels-last), which the backward
    receives in place of the input."""
    outputs = forward.graph.output_node().args[0]
    copies = {}
    for node, name in zip(outputs, returned_names(code.source)):
        if isinstance(node, fx.Node) and node.op == "placeholder" and name is not None and name != node.name:
            copies[node.name] = code.buffer_bytes.get(name, 0)
    return copies
_REASON_CHARS = 200  # of an exception's message quoted in an assumption


_REORDERING = "graphopt_reordering"  # forward.meta key: what `_reorder` did to the split


def _reorder(analysis: Analysis, forward: fx.GraphModule, backward: fx.GraphModule) -> tuple[GraphReordering, ...]:
    """Memory-aware order of both graphs, in place (graphopt/passes/reorder_graph.py).

    A graph whose order graphopt changed beat Inductor's own heuristics on the
    simulation, so Inductor is told to keep it; otherwise Inductor reorders as usual.
    """
    static = analysis.static_bytes + analysis.extra_static_bytes
    results = []
    for name, graph_module, owned in (
        ("forward", forward, None),
        ("backward", backward, _backward_owned_inputs(analysis, backward)),
    ):
        result = reorder_graph(graph_module, owned)
        if result.reordered:
            torch_private.keep_order_through_inductor(graph_module)
        results.append(
            GraphReordering(
                graph=name,
                method=result.method,
                peak_before_bytes=static + result.peak_before_bytes,
                peak_after_bytes=static + result.peak_after_bytes,
                inductor_reorder=not result.reordered,
            )
        )
    forward.meta[_REORDERING] = tuple(results)
    return tuple(results)


def _backward_owned_inputs(analysis: Analysis, backward: fx.GraphModule) -> dict[str, object]:
    """The backward's inputs it owns (saved tensors, tangents), keyed by storage.

    A saved view and what it views are one storage; graph inputs (parameters, the
    batch) are static memory, counted already.
    """
    joint_nodes = {node.name: node for node in analysis.timeline_nodes}
    static_names = {n.name for n in analysis.static_input_nodes}
    owned = {}
    for placeholder in backward.graph.find_nodes(op="placeholder"):
        if placeholder.name in static_names:
            continue
        joint_node = joint_nodes.get(placeholder.name)
        owned[placeholder.name] = storage_owner(joint_node).name if joint_node is not None else placeholder.name
    return owned


def saved_nodes(joint, analysis: Analysis, actions: Sequence[str]) -> list[fx.Node]:
    """Kept candidates, plus the graph inputs the backward or its recomputations read."""
    kept = [node for node, action in zip(analysis.candidate_nodes, actions) if action == KEEP]
    readers = list(joint.backward_nodes) + [n for n, a in zip(analysis.candidate_nodes, actions) if a == RECOMPUTE]
    inputs = {s for reader in readers for s in reader.all_input_nodes if s.op == "placeholder"}
    primals = [p for p in joint.primals if p in inputs]
    return primals + kept


def _infeasible(analysis: Analysis, options: Options, least: int, best: Solution, *, timed_out: bool) -> BudgetInfeasibleError:
    """The error naming the least reachable peak and the least budget graphopt can meet.

    `least` is the lowest simulated peak of any plan tried (so it is reachable); the
    least budget adds the headroom graphopt keeps for the simulation's error.
    `timed_out`: the planning time ran out before every sweep point was tried.
    """
    least_budget = least_budget_shown(least / (1 - options.prediction_headroom))
    timeline = memory_timeline(analysis.problem, best.actions)
    phase = "forward" if timeline.index(max(timeline)) < analysis.problem.num_forward_steps else "backward"
    breakdown = _memory_no_decision_changes(analysis, gradients=False)
    breakdown["activations, gradients and temporaries"] = least - sum(breakdown.values())
    parts = ", ".join(f"{kind} {format_bytes(size)}" for kind, size in breakdown.items())
    return BudgetInfeasibleError(
        f"no plan fits memory_budget={format_bytes(options.memory_budget_bytes)}: the least reachable peak is "
        f"{format_bytes(least)} (in the {phase}: {parts}); with the {options.prediction_headroom:.0%} headroom graphopt "
        f"keeps for its prediction error, the least budget it can meet is {format_bytes(least_budget)}. "
        "Raise the budget to at least that, or shrink the batch."
        + (
            f" (Planning stopped when its {options.solver_time_limit_s:g} s ran out; a larger "
            "solver_time_limit_s may find a lower peak.)"
            if timed_out
            else ""
        ),
        least_peak_bytes=least,
        least_budget_bytes=least_budget,
        breakdown=breakdown,
    )


def _memory_no_decision_changes(analysis: Analysis, *, gradients: bool) -> dict[str, int]:
    """The plan's static memory by kind, as `Plan.memory` and the infeasible error's
    breakdown show it (the breakdown leaves gradients with the activations)."""
    memory = {"parameters": analysis.parameter_bytes, "inputs": analysis.static_bytes - analysis.parameter_bytes}
    if gradients:
        memory["gradients"] = analysis.gradient_bytes
    memory["other graphs"] = analysis.extra_static_bytes
    if analysis.room_after_forward:
        memory["room for later graphs"] = analysis.room_after_forward
    if analysis.later_gradients:
        memory["later graphs' gradients"] = analysis.later_gradients
    return memory


# ----------------------------------------------------------------------------- plan


def build_plan(
    joint,
    options: Options,
    graph: str,
    analysis: Analysis,
    solution: Solution,
    predicted_peak: int,
    forward: fx.GraphModule,
    backward: fx.GraphModule,
    reordering: tuple[GraphReordering, ...] = (),
    *,
    roofline: Analysis | None = None,
    assumptions: Sequence[str] = (),
) -> Plan:
    """The plan `solution` makes of `analysis`. `roofline` is the analysis with the cost
    model's own prices where `analysis` counts min-cut's recomputations as free
    (`_learn_from_min_cut`): reasons quote both. `assumptions` are what planning assumed;
    the plan adds its prediction's (`_PREDICTION_FALLBACK`)."""
    problem = analysis.problem
    roofline_problem = (roofline or analysis).problem
    decisions = []
    keys = decision_keys(analysis.candidate_nodes)
    for index, (node, key, candidate, action) in enumerate(
        zip(analysis.candidate_nodes, keys, problem.candidates, solution.actions)
    ):
        if action == DROP or candidate.size_bytes == 0:
            continue
        decisions.append(
            Decision(
                node=node.name,
                key=key,
                tensor=tensor_name(node),
                action=parse_action(action)[0],
                bits=parse_action(action)[1],
                error=action_error(candidate, action),
                bytes=candidate.size_bytes,
                added_ms=action_ms(candidate, action),
                reason=_reason(
                    node, candidate, redo_ms(problem, index), action, problem, solution.method,
                    roofline_ms=redo_ms(roofline_problem, index),
                ),
                source=source_line(node),
            )
        )
    memory = _memory_no_decision_changes(analysis, gradients=True)
    timeline = _simulated_timeline(joint, analysis, forward, backward, options)
    forward_steps, _ = _graph_timelines(joint, analysis, forward, backward, options)
    return Plan(
        graph=graph,
        budget_bytes=problem.budget_bytes,
        predicted_peak_bytes=predicted_peak,
        predicted_added_ms=solution.added_ms,
        method=solution.method,
        solve_s=solution.solve_s,
        memory=memory,
        decisions=tuple(decisions),
        # The simulation of the split graphs in their final order, as predicted_peak is.
        timeline_bytes=tuple(timeline),
        num_forward_steps=len(forward_steps),
        reordering=reordering,
        torch_version=torch.__version__,
        assumptions=tuple(dict.fromkeys([*assumptions, *filter(None, [forward.meta.get(_PREDICTION_FALLBACK)])])),
        passes=forward.meta.get(_PASSES, ()),
    )


def _reason(
    node: fx.Node, candidate, redo_ms: float, action: str, problem: Problem, method: str, *, roofline_ms: float
) -> str:
    """Why the plan took `action` for the candidate. `redo_ms` is what the program priced
    redoing it at, `roofline_ms` what the cost model says (they differ where min-cut
    recomputes the tensor: it fuses into a backward kernel, which the roofline cannot see)."""
    if storage_owner(node).target == ALL_GATHER and action == RECOMPUTE:
        return "gathered again: FSDP2 frees a block's unsharded parameters after its forward and all-gathers them for its backward"
    if method == "torch-min-cut":
        return f"{'kept' if action == KEEP else 'recomputed'} by torch's min-cut, which fits the budget"
    if method == "given plan":
        return f"{action}: as the given plan says"
    if action == KEEP:
        if torch_private.is_random(node):
            return "kept: a random draw, the backward must see the same values"
        policy = torch_private.checkpoint_policy(node)
        if policy == "MUST_SAVE":
            return "kept: the user's checkpoint policy says MUST_SAVE"
        if not candidate.can_recompute:
            return "kept: cannot be recomputed (must stay in the forward)"
        cost = f"0 ms, fused as in torch's min-cut ({_ms(roofline_ms)} unfused)" if redo_ms != roofline_ms else _ms(roofline_ms)
        return f"kept: recomputing would add {cost} and the budget has room"
    if action not in (RECOMPUTE, DROP):
        return _alternative_reason(node, candidate, action)
    span = candidate.backward_last_use - candidate.free_at
    redo = (
        f"redone inside a backward kernel as torch's min-cut does (counted 0 ms; {_ms(roofline_ms)} unfused)"
        if redo_ms != roofline_ms
        else f"{_ms(roofline_ms)} to redo"
    )
    return f"recompute: {redo}, frees {format_bytes(candidate.size_bytes)} for {span} of {problem.num_steps} steps"


def _ms(value: float) -> str:
    """A time as a reason quotes it; a nonzero one never reads as 0.000."""
    return "0 ms" if value == 0 else f"{value:.3f} ms" if value >= 0.0005 else "under 0.001 ms"


def _alternative_reason(node: fx.Node, candidate, action: str) -> str:
    """Why a tensor is offloaded or quantized: what it holds instead, what it costs."""
    alternative = candidate.alternative(action)
    kind, bits = parse_action(action)
    held = max((size for _, _, size in alternative.intervals if size < candidate.size_bytes), default=0)
    if torch_private.checkpoint_policy(node) == "MUST_CPU_OFFLOAD":
        why = "the user's checkpoint policy says MUST_CPU_OFFLOAD"
    elif kind == "offload":
        why = "the host link hides most of the copy"
    else:
        why = f"{format_bytes(held)} held instead of {format_bytes(candidate.size_bytes)} until the backward needs it"
    error = f", expected relative squared error {alternative.error:.2g}" if alternative.error else ""
    width = f" to {width_label(bits)}" if bits else ""
    return f"{kind}{width}: {why}; adds {alternative.added_ms:.3f} ms{error}"


def tensor_name(node: fx.Node) -> str:
    """Module path and op: ``layers.0.mlp.fc1: addmm``."""
    path = module_path(node)
    return f"{path}: {_op_name(node)}" if path else f"{node.name}: {_op_name(node)}"


def decision_keys(nodes: Sequence[fx.Node]) -> list[str]:
    """Names for candidates that survive retracing, with their dtype and shape:
    ``blocks.0.mlp.fc1: addmm #0 float32[8,64]``.

    FX node names shift whenever the graph changes (another block, another trace); the
    module path, the op and how many earlier candidates share both do not. A saved plan
    is matched to a graph by these keys, so one made for other shapes or dtypes does not
    match (`key_tensor` and `key_value` split a key to say what differs).
    """
    seen: dict[str, int] = {}
    keys = []
    for node in nodes:
        base = f"{module_path(node)}: {_op_name(node)}"
        keys.append(f"{base} #{seen.get(base, 0)} {value_label(node)}")
        seen[base] = seen.get(base, 0) + 1
    return keys


def value_label(node: fx.Node) -> str:
    """The dtype and shape of a node's value, without spaces: ``float32[8,64]`` (tensors
    of a tuple joined by ``+``; ``-`` for a value without tensors)."""
    value = node.meta.get("val")
    tensors = [t for t in (value if isinstance(value, (tuple, list)) else (value,)) if isinstance(t, torch.Tensor)]
    labels = (f"{str(t.dtype).removeprefix('torch.')}[{','.join(str(size) for size in t.shape)}]" for t in tensors)
    return "+".join(labels).replace(" ", "") or "-"


def key_tensor(key: str) -> str:
    """A decision key without its dtype and shape: ``blocks.0.mlp.fc1: addmm #0``."""
    return key.rpartition(" ")[0]


def key_value(key: str) -> str:
    """A decision key's dtype and shape: ``float32[8,64]``."""
    return key.rpartition(" ")[2]


def module_path(node: fx.Node) -> str:
    """The innermost module that produced the node (``layers.0.mlp.fc1``), or ""."""
    stack = node.meta.get("nn_module_stack") or {}
    return clean_module_path(list(stack.values())[-1][0]) if stack else ""


def _op_name(node: fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target)).split(".")[0]


def clean_module_path(raw: str) -> str:
    """An ``nn_module_stack`` entry's Dynamo source as a ``named_modules()`` path."""
    return torch_private.source_attribute_path(raw)


_FRAME = re.compile(r'File "([^"]+)", line (\d+)')


def source_line(node: fx.Node) -> str | None:
    """The user's source line that produced the node ("model.py:41")."""
    trace = node.meta.get("stack_trace")
    if not trace:
        return None
    frames = _FRAME.findall(trace)
    if not frames:
        return None
    filename, line = frames[-1]
    return f"{filename.rsplit('/', 1)[-1]}:{line}"
