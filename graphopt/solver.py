"""Choosing keep / recompute / offload / quantize per candidate: a mixed-integer program,
with a greedy fallback.

This is the only module that imports pulp. It sees a ``Problem`` (plain lists of sizes,
costs and lifetimes) and returns a ``Solution``; it never sees an FX node.

The program, with binaries ``s_i`` (keep), ``r_i`` (recompute) and ``a_ik`` (the
candidate's k-th alternative: offload, quantize(bits), offload of a quantized copy):

    minimise   Σ r_i·recompute_ms_i + Σ a_ik·(ms_ik + λ·error_ik)  +  ε·Σ s_i·MB_i
    subject to s_i + r_i + Σ_k a_ik = 1   if the backward reads i, else ≤ 1
               r_i ≤ s_j + r_j + Σ_k a_jk for every input j of i's producer
               h_o ≥ s_v for o and every candidate v viewing o's buffer
               R_i,p ≤ R_i,p'  for consecutive start points p < p' of i;  R_i,last = r_i
               R_j,⌊p⌋ ≥ R_i,p + r_j − 1   for every input j of i and start point p of i
               D_k = D_{k-1} + Σ (changes at event k)
               D_k + max base(segment k) ≤ budget

(λ is ``problem.error_weight_ms``; ε only breaks ties; ``h_o``, whether buffer o is
kept through itself or a view of it, is what a kept buffer charges: ``s_o`` when nothing
views it.)

When a recomputed tensor is redone depends on the other decisions: just before its own
first backward read, or earlier, when a tensor recomputed from it is redone first (a
block recomputed from its kept input, as checkpointing does, redoes every link of the
chain in turn). Its possible start steps are its own first read and those of the
tensors that can be recomputed from it (``_start_points``); ``R_i,p`` (continuous,
0..1) says whether i has been redone by step p. The linking row makes an input
recomputed before each reader that is, and memory counts i from the first step where
``R_i`` rises. ``⌊p⌋`` is j's latest start point at or before p (no such point: ``R`` is
0 there, and i may not start at p while j is recomputed). Keeping only the latest
``MAX_START_POINTS`` start points per tensor bounds the program; it forbids recomputing
a tensor further ahead of its own use than that, and nothing else.

Decision memory changes only at a few events (a kept tensor outlives its forward use; a
recomputed one appears; an alternative's intervals open and close; each dies after its
last use), so one running sum ``D_k`` per event keeps the program sparse: O(candidates ×
(alternatives + start points)) rows instead of O(candidates × steps).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import pulp

from .problem import DROP, KEEP, RECOMPUTE, Problem, Solution, action_ms, evaluate, memory_timeline, storage_holder

MB = 2**20
# One MB kept costs as much as this many ms: small enough never to trade real time for
# memory, large enough to prefer the smaller of two equally fast plans.
TIE_BREAK_MS_PER_MB = 1e-6
# In the least-peak program, one MB kept anywhere weighs this many MB of peak.
LEAST_PEAK_KEPT_WEIGHT = 1e-3
# Start steps the program considers per recomputed tensor, latest first. On the bench
# GPT 8 reach the same least peak as 48 (a block redone from its kept input needs only
# the few reads nearest its own); the least-peak solve took 5 s with 12, 9 s with 16
# and 43 s with 48 (2-core machine, HiGHS).
MAX_START_POINTS = 12

Progress = Callable[[str], None]


def solve(
    problem: Problem,
    *,
    time_limit_s: float = 30.0,
    relative_gap: float = 0.005,
    progress: Progress | None = None,
    start: Sequence[str] | None = None,
) -> Solution | None:
    """The fastest plan under the budget, or None when no plan fits.

    With ``problem.budget_bytes`` None, returns the plan of least peak instead. `start`
    (actions, one per candidate) is a plan known already: where it fits, the answer is
    never worse than it, however soon the time limit stops the search. The search does
    not begin from it (HiGHS would then stop at another plan within its gap, and a
    plan would depend on the order budgets were tried in), so it only bounds the answer.
    """
    if problem.budget_bytes is not None and max(problem.base_bytes, default=0) > problem.budget_bytes:
        return None  # what no decision changes is over the budget already
    started = time.perf_counter()
    if progress:
        progress(f"solving keep/recompute for {len(problem.candidates)} tensors (limit {time_limit_s:.0f} s)")
    actions, status = _solve_milp(problem, time_limit_s, relative_gap)
    found = [(actions, f"milp-{status}")] if actions is not None else []
    if start is not None:  # the search may have stopped before it reached its start
        found.append((list(start), "milp-start"))
    elapsed = time.perf_counter() - started
    fitting = [evaluate(problem, plan, method, elapsed) for plan, method in found]
    fitting = [solution for solution in fitting if problem.budget_bytes is None or solution.peak_bytes <= problem.budget_bytes]
    if not fitting:
        fallback = greedy(problem)
        if fallback is None:
            return None
        fitting = [evaluate(problem, fallback.actions, "greedy", time.perf_counter() - started)]
    # The search's own answer first: on a tie it wins, having weighed what the objective
    # weighs beyond peak or time (the least-peak program keeps the fewest bytes).
    if problem.budget_bytes is None:
        return min(fitting, key=lambda solution: solution.peak_bytes)
    return min(fitting, key=lambda solution: solution.added_ms)


def least_peak(problem: Problem, *, time_limit_s: float = 30.0, start: Sequence[str] | None = None) -> Solution:
    """The plan of least peak memory (ignores the budget); never above `start`'s peak."""
    unconstrained = dataclasses.replace(problem, budget_bytes=None)
    solution = solve(unconstrained, time_limit_s=time_limit_s, start=start)
    assert solution is not None, "the least-peak program always has a solution"
    return solution


# ----------------------------------------------------------------------------- MILP


def _solver(time_limit_s: float, relative_gap: float) -> pulp.LpSolver:
    highs = _QuietHiGHS(time_limit_s, relative_gap)
    if highs.available():
        return highs
    return pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s, gapRel=relative_gap)


class _QuietHiGHS(pulp.HiGHS):
    """pulp's HiGHS interface, silent from the start.

    HiGHS writes a banner to the process's stdout (the file descriptor, from C++) when a
    ``highspy.Highs`` with output on registers its callbacks, which its constructor does
    before pulp can pass ``output_flag=False``; so the solver object is made here, with
    output turned off before the callbacks are registered.
    """

    def __init__(self, time_limit_s: float, relative_gap: float):
        super().__init__(msg=False, timeLimit=time_limit_s, gapRel=relative_gap)

    def createAndConfigureSolver(self, lp: pulp.LpProblem) -> None:  # noqa: N802 - pulp's name
        import highspy

        class QuietHighs(highspy.Highs):
            def enableCallbacks(self) -> None:  # noqa: N802 - highspy's name
                self.setOptionValue("output_flag", False)
                super().enableCallbacks()

        lp.solverModel = QuietHighs()
        lp.solverModel.setOptionValue("output_flag", False)
        lp.solverModel.setOptionValue("mip_rel_gap", self.gapRel)
        lp.solverModel.setOptionValue("time_limit", float(self.timeLimit))


def _solve_milp(problem: Problem, time_limit_s: float, relative_gap: float) -> tuple[list[str] | None, str]:
    program = pulp.LpProblem("graphopt_keep_recompute", pulp.LpMinimize)
    keep, recompute, alternatives = _decision_variables(program, problem)
    peak = _variable(program, "peak_mb", lowBound=0) if problem.budget_bytes is None else None

    available = [keep[i] + recompute[i] + pulp.lpSum(alternatives[i]) for i in range(len(problem.candidates))]
    for index, candidate in enumerate(problem.candidates):
        chosen = available[index]
        program += (chosen == 1) if candidate.needed_by_backward else (chosen <= 1)
        if candidate.can_recompute:
            for input_index in candidate.inputs:
                program += recompute[index] <= available[input_index]
    redone = _recompute_start_rows(program, problem, recompute, available)

    _add_memory_rows(program, problem, keep, redone, alternatives, peak)

    time_ms = pulp.lpSum(c.recompute_ms * recompute[i] for i, c in enumerate(problem.candidates))
    time_ms += pulp.lpSum(
        (alternative.added_ms + problem.error_weight_ms * alternative.error) * alternatives[i][k]
        for i, c in enumerate(problem.candidates)
        for k, alternative in enumerate(c.alternatives)
    )
    tie_break = pulp.lpSum(TIE_BREAK_MS_PER_MB * c.size_bytes / MB * keep[i] for i, c in enumerate(problem.candidates))
    # At equal time, keeping beats an offload whose copy the model says is hidden: the
    # copies still share one link and pinned memory the model does not price.
    tie_break += pulp.lpSum(
        2 * TIE_BREAK_MS_PER_MB * c.size_bytes / MB * variable
        for i, c in enumerate(problem.candidates)
        for variable in alternatives[i]
    )
    if peak is None:
        program += time_ms + tie_break
    else:
        # Least peak first; among plans of (nearly) that peak, the one keeping the fewest
        # bytes: the model's recompute windows are conservative, so keeping less lowers
        # the real peak more than the model shows.
        kept_mb = pulp.lpSum(c.size_bytes / MB * keep[i] for i, c in enumerate(problem.candidates))
        program += peak + LEAST_PEAK_KEPT_WEIGHT * kept_mb

    program.solve(_solver(time_limit_s, relative_gap))
    status = pulp.LpStatus[program.status]
    found = program.sol_status in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible)
    if not found or not _has_incumbent(keep + recompute + [v for row in alternatives for v in row]):
        return None, status.lower()
    actions = []
    for index, candidate in enumerate(problem.candidates):
        chosen = [a.action for a, variable in zip(candidate.alternatives, alternatives[index]) if _is_one(variable)]
        if _is_one(keep[index]):
            actions.append(KEEP)
        elif _is_one(recompute[index]):
            actions.append(RECOMPUTE)
        elif chosen:
            actions.append(chosen[0])
        else:
            actions.append(DROP)
    label = "optimal" if status == "Optimal" else "time-limit"
    return actions, label


def _variable(program: pulp.LpProblem, name: str, **kwargs) -> pulp.LpVariable:
    """A variable attached to the program (pulp >= 3.3), or a free one on older pulp."""
    if hasattr(program, "add_variable"):
        return program.add_variable(name, **kwargs)
    return pulp.LpVariable(name, **kwargs)


def _decision_variables(program: pulp.LpProblem, problem: Problem) -> tuple[list, list, list[list]]:
    keep, recompute, alternatives = [], [], []
    for index, candidate in enumerate(problem.candidates):
        keep.append(_variable(program, f"keep_{index}", cat="Binary") if candidate.can_keep else 0)
        recompute.append(_variable(program, f"recompute_{index}", cat="Binary") if candidate.can_recompute else 0)
        alternatives.append(
            [_variable(program, f"alternative_{index}_{k}", cat="Binary") for k in range(len(candidate.alternatives))]
        )
    return keep, recompute, alternatives


def _held(program: pulp.LpProblem, problem: Problem, keep: list) -> list:
    """Per candidate, whether its buffer is kept: kept itself, or through a kept view of
    it (``Candidate.storage_of``); a buffer several kept views share counts once."""
    holders: dict[int, list] = {}
    for index in range(len(problem.candidates)):
        holders.setdefault(storage_holder(problem, index), []).append(keep[index])
    held = list(keep)
    for owner, keeps in holders.items():
        if len(keeps) > 1:
            held[owner] = _variable(program, f"held_{owner}", lowBound=0, upBound=1)
            for variable in keeps:
                program += held[owner] >= variable
    return held


def _start_points(problem: Problem) -> list[list[int]]:
    """Per candidate, the steps its recomputation may start at, ascending: its own first
    backward read and its recomputable readers' start points before it, the latest
    ``MAX_START_POINTS`` of them."""
    points: list[list[int]] = [[] for _ in problem.candidates]
    for index in reversed(range(len(problem.candidates))):
        candidate = problem.candidates[index]
        if not candidate.can_recompute:
            continue
        found = {candidate.backward_first_use} if candidate.needed_by_backward else set()
        for reader in problem.readers[index]:
            found.update(points[reader])
        if candidate.needed_by_backward:
            found = {step for step in found if step <= candidate.backward_first_use}
        points[index] = sorted(found)[-MAX_START_POINTS:]
    return points


def _recompute_start_rows(program: pulp.LpProblem, problem: Problem, recompute: list, available: list) -> list[list[tuple[int, object]]]:
    """Per candidate, ``(step, R)`` for each start point: R is 1 once the candidate has
    been redone by that step (the last R is ``r_i`` itself), and an input is redone no
    later than any reader recomputed from it."""
    points = _start_points(problem)
    redone: list[list[tuple[int, object]]] = []
    for index, steps in enumerate(points):
        row: list[tuple[int, object]] = []
        for position, step in enumerate(steps):
            if position == len(steps) - 1:
                variable = recompute[index]
            else:
                variable = _variable(program, f"redone_{index}_{position}", lowBound=0, upBound=1)
            if row:
                program += row[-1][1] <= variable
            row.append((step, variable))
        redone.append(row)
    for index, candidate in enumerate(problem.candidates):
        if not candidate.can_recompute:
            continue
        for source in candidate.inputs:
            if not problem.candidates[source].can_recompute:
                continue
            source_row = redone[source]
            for step, variable in redone[index]:
                at_or_before = [v for s, v in source_row if s <= step]
                if at_or_before and at_or_before[-1] is recompute[source]:
                    continue  # the input's last start point: redone by then whenever recomputed
                # Binding only when the input is recomputed (kept or held otherwise, it is
                # there): R_j >= R_i - (available_j - r_j), tighter than R_i + r_j - 1.
                otherwise_there = available[source] - recompute[source]
                program += (at_or_before[-1] if at_or_before else 0) >= variable - otherwise_there
    return redone


def _add_memory_rows(program: pulp.LpProblem, problem: Problem, keep: list, redone: list, alternatives: list, peak) -> None:
    """Running sums of decision memory at each event; one budget row per segment."""
    changes: dict[int, list] = {}
    held = _held(program, problem, keep)
    for index, candidate in enumerate(problem.candidates):
        for alternative, variable in zip(candidate.alternatives, alternatives[index]):
            for first, last, bytes_held in alternative.intervals:
                changes.setdefault(first, []).append(bytes_held / MB * variable)
                changes.setdefault(last + 1, []).append(-bytes_held / MB * variable)
        size_mb, redone_mb = candidate.size_bytes / MB, candidate.recomputed_size_bytes / MB
        end = problem.last_needed[index] + 1
        if size_mb:
            changes.setdefault(candidate.free_at + 1, []).append(size_mb * held[index])
            changes.setdefault(end, []).append(-size_mb * held[index])
        if redone_mb and redone[index]:
            previous = 0
            for step, variable in redone[index]:
                changes.setdefault(step, []).append(redone_mb * (variable - previous))
                previous = variable
            changes.setdefault(end, []).append(-redone_mb * previous)
    events = sorted(step for step in changes if step < problem.num_steps)
    if not events or events[0] != 0:
        events.insert(0, 0)
    limit = None if problem.budget_bytes is None else problem.budget_bytes / MB
    previous = None
    for position, start in enumerate(events):
        end = events[position + 1] if position + 1 < len(events) else problem.num_steps
        running = _variable(program, f"memory_mb_{position}")
        program += running == (previous if previous is not None else 0) + pulp.lpSum(changes.get(start, []))
        segment_base_mb = max(problem.base_bytes[start:end]) / MB
        program += running + segment_base_mb <= (peak if peak is not None else limit)
        previous = running


def _value(variable) -> float | None:
    return variable if isinstance(variable, (int, float)) else variable.varValue


def _is_one(variable) -> bool:
    value = _value(variable)
    return value is not None and value > 0.5


def _has_incumbent(variables: list) -> bool:
    return all(_value(v) is not None for v in variables)


# ----------------------------------------------------------------------------- greedy


def greedy(problem: Problem) -> Solution | None:
    """Keep everything the backward reads, then recompute (or offload, or quantize) the
    most bytes per ms until it fits: for each kept tensor, the cheapest move that lowers
    the peak.

    Always valid, rarely optimal: the fallback when the MILP finds nothing in time.
    """
    actions = [DROP] * len(problem.candidates)
    for index, candidate in enumerate(problem.candidates):
        if candidate.needed_by_backward:
            _make_available(problem, actions, index)
    budget = problem.budget_bytes
    peak = max(memory_timeline(problem, actions))
    order = sorted(
        range(len(problem.candidates)),
        key=lambda i: problem.candidates[i].size_bytes / (problem.candidates[i].recompute_ms + 1e-6),
        reverse=True,
    )
    improved = True
    while improved and (budget is None or peak > budget):
        improved = False
        for index in order:
            if actions[index] != KEEP:
                continue
            for move in _moves(problem, index):
                trial = list(actions)
                trial[index] = move
                if move == RECOMPUTE:
                    for input_index in problem.candidates[index].inputs:
                        if trial[input_index] == DROP:
                            _make_available(problem, trial, input_index)
                trial_peak = max(memory_timeline(problem, trial))
                if trial_peak < peak:
                    actions, peak, improved = trial, trial_peak, True
                    break
            if improved and budget is not None and peak <= budget:
                break
    if budget is not None and peak > budget:
        return None
    return evaluate(problem, actions, "greedy")


def _moves(problem: Problem, index: int) -> list[str]:
    """What a kept candidate could do instead, cheapest first (time plus error penalty)."""
    candidate = problem.candidates[index]
    moves = [RECOMPUTE] if candidate.can_recompute else []
    moves += [a.action for a in candidate.alternatives]
    return sorted(moves, key=lambda move: _charged_ms(problem, index, move))


def _charged_ms(problem: Problem, index: int, action: str) -> float:
    candidate = problem.candidates[index]
    alternative = candidate.alternative(action) if action != RECOMPUTE else None
    penalty = problem.error_weight_ms * alternative.error if alternative is not None else 0.0
    return action_ms(candidate, action) + penalty


def _make_available(problem: Problem, actions: list[str], index: int) -> None:
    if actions[index] != DROP:
        return
    candidate = problem.candidates[index]
    if candidate.can_keep:
        actions[index] = KEEP
        return
    if not candidate.can_recompute and candidate.alternatives:  # a user's offload policy
        actions[index] = min(_moves(problem, index), key=lambda move: _charged_ms(problem, index, move))
        return
    actions[index] = RECOMPUTE
    for input_index in candidate.inputs:
        _make_available(problem, actions, input_index)
