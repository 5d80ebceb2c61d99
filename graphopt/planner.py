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
from collections.abc import Sequence

import torch.fx as fx

from . import torch_private
from .analysis import Analysis, NodeCost, analyze, parameter_bytes
from .budget import format_bytes
from .config import Options
from .cost_models import MeasuredCostModel, estimate_node_cost
from .cost_models.memory import graph_timeline, storage_owner
from .errors import BudgetInfeasibleError
from .plan import Decision, Plan
from .problem import DROP, KEEP, RECOMPUTE, Problem, Solution, memory_timeline
from .solver import least_peak, solve

log = logging.getLogger("graphopt")

# How often the budget is tightened after simulating the split graphs.
MAX_REPAIR_ROUNDS = 6
# A fitting plan that leaves more of the usable budget than this unused is loosened.
SNUG_FRACTION = 0.02
# Program budgets tried, evenly spaced, before reporting that nothing fits.
SWEEP_POINTS = 8


@dataclasses.dataclass
class Session:
    """One ``graphopt.compile`` call: its options, and what its graphs planned so far.

    Graph breaks give several joint graphs; tensors saved by earlier graphs stay alive
    while later graphs run, so each graph plans against what the earlier ones keep.
    """

    options: Options
    plans: list[Plan] = dataclasses.field(default_factory=list)
    saved_bytes: dict[str, int] = dataclasses.field(default_factory=dict)  # by graph name
    _measured: MeasuredCostModel | None = None

    def other_graphs_bytes(self, graph: str, parameter_bytes: int) -> int:
        earlier = sum(size for name, size in self.saved_bytes.items() if name != graph)
        other_parameters = max(self.options.model_static_bytes - parameter_bytes, 0)
        return earlier + other_parameters

    def node_cost(self) -> NodeCost:
        """How ops are priced: the roofline, or times measured on this machine (cached)."""
        if self.options.cost_model == "measured":
            if self._measured is None:
                self._measured = MeasuredCostModel(self.options.hardware)
            return self._measured.node_cost
        return functools.partial(estimate_node_cost, hardware=self.options.hardware)

    def record(self, plan: Plan, saved_bytes: int) -> None:
        self.plans = [p for p in self.plans if p.graph != plan.graph] + [plan]
        self.saved_bytes[plan.graph] = saved_bytes


def partition(
    session: Session,
    graph_name: str,
    joint_module: fx.GraphModule,
    joint_inputs: Sequence[object],
    *,
    num_fwd_outputs: int,
    static_lifetime_input_indices: Sequence[int] | None = None,
    **_: object,
) -> tuple[fx.GraphModule, fx.GraphModule]:
    """graphopt's partition function (the signature AOTAutograd and Inductor call)."""
    joint = torch_private.prepare_joint_graph(
        joint_module, num_fwd_outputs=num_fwd_outputs, static_lifetime_input_indices=static_lifetime_input_indices
    )
    if not torch_private.has_backward(joint):
        return torch_private.default_partition(
            joint.module, joint_inputs, num_fwd_outputs=num_fwd_outputs,
            static_lifetime_input_indices=static_lifetime_input_indices,
        )
    options = session.options
    extra = session.other_graphs_bytes(graph_name, parameter_bytes(joint))
    analysis = analyze(
        joint,
        options.hardware,
        budget_bytes=options.memory_budget_bytes,
        extra_static_bytes=extra,
        node_cost=session.node_cost(),
    )
    solution, forward, backward, predicted_peak = _torch_default(joint, joint_inputs, analysis)
    if options.memory_budget_bytes is not None and predicted_peak > _usable(options):
        analysis = _learn_from_min_cut(analysis, solution)
        solution, forward, backward, predicted_peak = _solve_and_split(joint, analysis, options, predicted_peak)
    plan = build_plan(graph_name, analysis, solution, predicted_peak, forward)
    session.record(plan, sum(d.bytes for d in plan.decisions if d.action == "keep"))
    log.info("%s", plan)
    return forward, backward


def _torch_default(joint, joint_inputs, analysis: Analysis):
    """torch's own min-cut, described as a plan.

    It is the fastest cut torch knows (it also weighs fusion, which our cost model does
    not), so whenever it fits the budget graphopt takes it and adds no time.
    """
    forward, backward = torch_private.min_cut_partition(joint, joint_inputs)
    saved = {n.name for n in backward.graph.find_nodes(op="placeholder")}
    recomputed = {n.name for n in backward.graph.nodes if n.op == "call_function"}
    actions = tuple(
        KEEP if node.name in saved else RECOMPUTE if node.name in recomputed else DROP
        for node in analysis.candidate_nodes
    )
    timeline = memory_timeline(analysis.problem, actions)
    added_ms = sum(c.recompute_ms for c, a in zip(analysis.problem.candidates, actions) if a == RECOMPUTE)
    solution = Solution(actions, max(timeline), added_ms, "torch-min-cut")
    return solution, forward, backward, _simulate(analysis, forward, backward)


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


def _solve_and_split(joint, analysis: Analysis, options: Options, default_peak: int):
    """Solve, split, simulate; move the program's budget until the simulation fits snugly.

    The program's memory model is approximate (see docs/design.md) in both directions;
    the simulation of the real split graphs is the judge. Each round shifts the
    program's budget by the simulation's distance from the usable budget: down when a
    plan overshoots, up when it leaves more than `SNUG_FRACTION` unused (a looser plan
    recomputes less). The fastest plan that fits wins. `default_peak` is torch's
    min-cut peak, the first point of reference.
    """
    problem = analysis.problem
    budget = _usable(options)
    target, least, best = budget, default_peak, None
    for _ in range(MAX_REPAIR_ROUNDS):
        solution = solve(dataclasses.replace(problem, budget_bytes=target), time_limit_s=options.solver_time_limit_s)
        if solution is None:  # below the model's least peak, which is conservative: try that plan
            solution = least_peak(problem, time_limit_s=options.solver_time_limit_s)
        forward, backward, predicted_peak = _split_and_simulate(joint, analysis, solution)
        least = min(least, predicted_peak)
        if predicted_peak <= budget:
            if best is None or solution.added_ms < best[0].added_ms:
                best = (solution, forward, backward, predicted_peak)
            if budget - predicted_peak <= SNUG_FRACTION * budget:
                break
        shifted = min(target, solution.peak_bytes) + (budget - predicted_peak)
        if shifted == target:
            break
        target = shifted
        log.info("simulated peak %s for a usable %s; replanning for %s", format_bytes(predicted_peak), format_bytes(budget), format_bytes(target))
    if best is not None:
        return best
    return _sweep(joint, analysis, options, least)


def _sweep(joint, analysis: Analysis, options: Options, least_seen: int):
    """Last resort before giving up: plans for program budgets from the model's least
    peak up to the default's, each simulated. The first that fits is used; otherwise
    the least simulated peak is what the error reports, so that number is reachable."""
    problem, budget = analysis.problem, _usable(options)
    floor = least_peak(problem, time_limit_s=options.solver_time_limit_s)
    best_solution, least = floor, least_seen
    for step in range(SWEEP_POINTS):
        target = floor.peak_bytes + (least_seen - floor.peak_bytes) * step // SWEEP_POINTS
        program = dataclasses.replace(problem, budget_bytes=target)
        solution = floor if step == 0 else solve(program, time_limit_s=options.solver_time_limit_s)
        if solution is None:
            continue
        forward, backward, predicted_peak = _split_and_simulate(joint, analysis, solution)
        if predicted_peak <= budget:
            return solution, forward, backward, predicted_peak
        if predicted_peak < least:
            best_solution, least = solution, predicted_peak
    raise _infeasible(analysis, options, least, best_solution)


def _usable(options: Options) -> int:
    """The part of the budget a simulated peak may fill."""
    return int(options.memory_budget_bytes * (1 - options.prediction_headroom))


def _split_and_simulate(joint, analysis: Analysis, solution: Solution):
    saved = saved_nodes(joint, analysis, solution.actions)
    forward, backward = torch_private.split_joint_graph(joint, saved)
    return forward, backward, _simulate(analysis, forward, backward)


def _simulate(analysis: Analysis, forward: fx.GraphModule, backward: fx.GraphModule) -> int:
    """Peak of the real split graphs, freed as Inductor frees them."""
    static = analysis.static_bytes + analysis.extra_static_bytes
    forward_peak = max(graph_timeline(forward), default=0)
    backward_peak = max(graph_timeline(backward, _backward_owned_inputs(analysis, backward)), default=0)
    return static + max(forward_peak, backward_peak)


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


def _infeasible(analysis: Analysis, options: Options, least: int, best: Solution) -> BudgetInfeasibleError:
    """The error naming the least budget graphopt can meet.

    `least` is the lowest simulated peak of any plan tried (so it is reachable); the
    least budget adds the headroom graphopt keeps for the simulation's error.
    """
    least_budget = math.ceil(least / (1 - options.prediction_headroom))
    timeline = memory_timeline(analysis.problem, best.actions)
    phase = "forward" if timeline.index(max(timeline)) < analysis.problem.num_forward_steps else "backward"
    breakdown = {
        "parameters": analysis.parameter_bytes,
        "inputs": analysis.static_bytes - analysis.parameter_bytes,
        "other graphs": analysis.extra_static_bytes,
    }
    breakdown["activations, gradients and temporaries"] = least - sum(breakdown.values())
    parts = ", ".join(f"{kind} {format_bytes(size)}" for kind, size in breakdown.items())
    return BudgetInfeasibleError(
        f"no plan fits memory_budget={format_bytes(options.memory_budget_bytes)}: the least reachable peak is "
        f"{format_bytes(least)} (in the {phase}: {parts}); with the {options.prediction_headroom:.0%} headroom graphopt "
        f"keeps for its prediction error, the least budget it can meet is {format_bytes(least_budget)}. "
        "Raise the budget to at least that, or shrink the batch.",
        least_peak_bytes=least_budget,
        breakdown=breakdown,
    )


# ----------------------------------------------------------------------------- plan


def build_plan(graph: str, analysis: Analysis, solution: Solution, predicted_peak: int, forward: fx.GraphModule) -> Plan:
    problem = analysis.problem
    decisions = []
    for node, candidate, action in zip(analysis.candidate_nodes, problem.candidates, solution.actions):
        if action == DROP or candidate.size_bytes == 0:
            continue
        decisions.append(
            Decision(
                node=node.name,
                tensor=tensor_name(node),
                action=action,
                bytes=candidate.size_bytes,
                added_ms=candidate.recompute_ms if action == RECOMPUTE else 0.0,
                reason=_reason(node, candidate, action, problem, solution.method),
                source=source_line(node),
            )
        )
    memory = {
        "parameters": analysis.parameter_bytes,
        "inputs": analysis.static_bytes - analysis.parameter_bytes,
        "gradients": analysis.gradient_bytes,
        "other graphs": analysis.extra_static_bytes,
    }
    return Plan(
        graph=graph,
        budget_bytes=problem.budget_bytes,
        predicted_peak_bytes=predicted_peak,
        predicted_added_ms=solution.added_ms,
        method=solution.method,
        solve_s=solution.solve_s,
        memory=memory,
        decisions=tuple(decisions),
        timeline_bytes=tuple(memory_timeline(problem, solution.actions)),
        num_forward_steps=problem.num_forward_steps,
    )


def _reason(node: fx.Node, candidate, action: str, problem: Problem, method: str) -> str:
    if method == "torch-min-cut":
        return f"{'kept' if action == KEEP else 'recomputed'} by torch's min-cut, which fits the budget"
    if action == KEEP:
        if torch_private.is_random(node):
            return "kept: a random draw, the backward must see the same values"
        policy = torch_private.checkpoint_policy(node)
        if policy == "MUST_SAVE":
            return "kept: the user's checkpoint policy says MUST_SAVE"
        if not candidate.can_recompute:
            return "kept: cannot be recomputed (must stay in the forward)"
        return f"kept: recomputing would add {candidate.recompute_ms:.3f} ms and the budget has room"
    span = candidate.backward_last_use - candidate.free_at
    return (
        f"recompute: {candidate.recompute_ms:.3f} ms to redo, frees {format_bytes(candidate.size_bytes)} "
        f"for {span} of {problem.num_steps} steps"
    )


def tensor_name(node: fx.Node) -> str:
    """Module path and op: ``layers.0.mlp.fc1: addmm``."""
    stack = node.meta.get("nn_module_stack") or {}
    path = ""
    if stack:
        raw = list(stack.values())[-1][0]
        path = _clean_module_path(raw)
    op = getattr(node.target, "__name__", str(node.target)).split(".")[0]
    return f"{path}: {op}" if path else f"{node.name}: {op}"


def _clean_module_path(raw: str) -> str:
    previous = None
    path = raw
    while path != previous:  # getattr(getattr(L['self'].a, '0'), 'b') nests
        previous, path = path, re.sub(r"getattr\(([^,()]+), '([^']+)'\)", r"\1.\2", path)
    path = re.sub(r"^L\['[^']+'\]", "", path)
    path = re.sub(r"\._modules\['([^']+)'\]", r".\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return path.strip(".")


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
