"""The keep/recompute program on synthetic problems with known optima (no torch involved)."""

import dataclasses
import itertools
import random

import pytest

from graphopt.problem import (
    DROP,
    KEEP,
    RECOMPUTE,
    Candidate,
    Problem,
    check_actions,
    evaluate,
    memory_timeline,
    recompute_starts,
)
from graphopt.solver import greedy, least_peak, solve

MB = 2**20


def chain_problem(budget_bytes, num_layers=4, size=10 * MB, cost_ms=1.0):
    """A chain a0 -> a1 -> ... ; the backward reads a_k at step (2L-1-k).

    Recomputing a_(k+1) needs a_k, so a recomputed a_k is redone at a_(k+1)'s use when
    a_(k+1) is recomputed too (the problem derives that; the uses here are own reads).
    """
    forward_steps = num_layers
    candidates = []
    for k in range(num_layers):
        own_use = forward_steps + (num_layers - 1 - k)
        first_use = last_use = own_use
        candidates.append(
            Candidate(
                name=f"a{k}",
                size_bytes=size,
                recompute_ms=cost_ms * (k + 1),
                inputs=(k - 1,) if k else (),
                free_at=k + 1 if k + 1 < forward_steps else k,
                backward_first_use=first_use,
                backward_last_use=last_use,
                needed_by_backward=True,
            )
        )
    base = tuple([0] * (2 * forward_steps))
    return Problem(tuple(candidates), base, forward_steps, budget_bytes)


def brute_force(problem):
    best = None
    for actions in itertools.product([KEEP, RECOMPUTE, DROP], repeat=len(problem.candidates)):
        try:
            solution = evaluate(problem, actions, "brute")
        except ValueError:
            continue
        if problem.budget_bytes is not None and solution.peak_bytes > problem.budget_bytes:
            continue
        if best is None or solution.added_ms < best.added_ms - 1e-9:
            best = solution
    return best


def test_loose_budget_keeps_everything():
    solution = solve(chain_problem(1000 * MB))
    assert solution.actions == (KEEP,) * 4
    assert solution.added_ms == 0
    assert solution.peak_bytes == 40 * MB


@pytest.mark.parametrize("budget_mb", [40, 35, 30, 25, 20, 15, 10])
def test_matches_brute_force(budget_mb):
    problem = chain_problem(budget_mb * MB)
    expected = brute_force(problem)
    solution = solve(problem)
    if expected is None:
        assert solution is None
        return
    assert solution.peak_bytes <= budget_mb * MB
    assert solution.added_ms == pytest.approx(expected.added_ms)


def test_recomputed_tensor_needs_its_input():
    problem = chain_problem(30 * MB)
    solution = solve(problem)
    for index, action in enumerate(solution.actions):
        if action == RECOMPUTE:
            for input_index in problem.candidates[index].inputs:
                assert solution.actions[input_index] in (KEEP, RECOMPUTE)


def test_infeasible_returns_none_and_least_peak_is_reported():
    problem = chain_problem(5 * MB)
    assert solve(problem) is None
    best = least_peak(problem)
    reachable = [
        evaluate(problem, actions, "brute").peak_bytes
        for actions in itertools.product([KEEP, RECOMPUTE], repeat=4)
    ]
    assert best.peak_bytes == min(reachable)
    assert min(memory_timeline(problem, best.actions)) >= 0


def test_base_memory_counts_at_its_step():
    problem = chain_problem(1000 * MB)
    base = list(problem.base_bytes)
    base[5] = 100 * MB  # a transient spike during the backward
    problem = Problem(problem.candidates, tuple(base), problem.num_forward_steps, 125 * MB)
    solution = solve(problem)
    assert solution.peak_bytes <= 125 * MB
    assert solution.actions.count(KEEP) < 4


def test_cannot_recompute_is_honoured():
    problem = chain_problem(30 * MB)
    frozen = tuple(
        dataclasses.replace(c, can_recompute=False) if c.name == "a0" else c for c in problem.candidates
    )
    problem = Problem(frozen, problem.base_bytes, problem.num_forward_steps, problem.budget_bytes)
    solution = solve(problem)
    assert solution.actions[0] == KEEP
    assert solution.added_ms == pytest.approx(brute_force(problem).added_ms)


def test_greedy_is_valid_and_within_budget():
    problem = chain_problem(30 * MB)
    solution = greedy(problem)
    assert solution is not None and solution.peak_bytes <= 30 * MB
    assert greedy(chain_problem(1 * MB)) is None


def test_large_problem_solves_quickly():
    problem = chain_problem(400 * MB, num_layers=300, size=2 * MB, cost_ms=0.01)
    solution = solve(problem, time_limit_s=20)
    assert solution is not None and solution.peak_bytes <= 400 * MB
    assert solution.solve_s < 20


def views_problem(budget_bytes):
    """A 12 MB buffer `qkv` and three views of it the backward reads (as ``unbind`` makes
    them); recomputing a view is free once its buffer is back, recomputing the buffer is not.

    Keeping any view keeps the whole buffer alive: one view kept costs what all three do.
    """
    size = 12 * MB
    candidates = [Candidate("qkv", size, 5.0, (), free_at=1, backward_first_use=4, backward_last_use=5, needed_by_backward=False)]
    for name in ("q", "k", "v"):
        candidates.append(
            Candidate(name, 0, 0.0, (0,), free_at=1, backward_first_use=5, backward_last_use=5, needed_by_backward=True, storage_of=0)
        )
    return Problem(tuple(candidates), (0, 0, 0, 0, 0, 0), 3, budget_bytes)


def test_kept_views_hold_their_buffer_once():
    problem = views_problem(None)
    timeline = memory_timeline(problem, (DROP, KEEP, KEEP, KEEP))
    assert max(timeline) == 12 * MB  # not 0 (views allocate nothing), not 36 MB
    assert memory_timeline(problem, (KEEP, KEEP, RECOMPUTE, RECOMPUTE)) == timeline
    # Recomputing the buffer holds it for its backward window only.
    assert memory_timeline(problem, (RECOMPUTE, RECOMPUTE, RECOMPUTE, RECOMPUTE))[:4] == [0, 0, 0, 0]


def test_views_match_brute_force():
    problem = views_problem(12 * MB)
    expected = brute_force(problem)
    solution = solve(problem)
    assert solution.added_ms == pytest.approx(expected.added_ms) == 0.0
    assert solution.peak_bytes == expected.peak_bytes == 12 * MB
    # Below the one buffer nothing fits; counted per view (0 bytes) it would have.
    assert brute_force(views_problem(11 * MB)) is None
    assert solve(views_problem(11 * MB)) is None


# ----------------------------------------------------------------------------- recompute chains


def test_a_recomputed_tensor_is_redone_when_its_first_reader_needs_it():
    """a -> b -> c, read by the backward at 20, 15 and 10: recomputing all three redoes
    each link when c is redone; with b kept, a waits for its own read."""
    candidates = (
        Candidate("a", 1 * MB, 1.0, (), 0, 20, 20, True),
        Candidate("b", 2 * MB, 1.0, (0,), 1, 15, 15, True),
        Candidate("c", 4 * MB, 1.0, (1,), 2, 10, 10, True),
    )
    problem = Problem(candidates, (0,) * 22, 3, None)
    assert recompute_starts(problem, (RECOMPUTE,) * 3) == [10, 10, 10]
    assert recompute_starts(problem, (RECOMPUTE, KEEP, RECOMPUTE)) == [20, None, 10]
    timeline = memory_timeline(problem, (RECOMPUTE,) * 3)
    assert timeline[10] == 7 * MB and timeline[16] == 1 * MB and timeline[21] == 0


def checkpoint_problem(budget_bytes):
    """Two blocks, as checkpointing cuts them: h1 (block 2's input) is read by block 2's
    backward at step 9; o1 (inside block 1, h1 computed from it) by block 1's backward
    at step 11; a 30 MB spike at steps 9-10. Kept h1 and recomputed o1, o1 appears at
    11 (20 + 30 MB at 9); a static window from h1's read would count it at 9 too."""
    candidates = (
        Candidate("o1", 10 * MB, 1.0, (), 0, 11, 11, True),
        Candidate("h1", 10 * MB, 1.0, (0,), 1, 9, 9, True),
    )
    base = [0] * 13
    base[9] = base[10] = 30 * MB
    return Problem(candidates, tuple(base), 2, budget_bytes)


def test_a_block_recomputed_from_its_kept_input_fits_where_its_input_is_read_first():
    problem = checkpoint_problem(40 * MB)
    solution = solve(problem)
    assert solution is not None and solution.actions == (RECOMPUTE, KEEP)
    assert solution.peak_bytes == 40 * MB == brute_force(problem).peak_bytes
    assert max(memory_timeline(problem, (RECOMPUTE, RECOMPUTE))) == 50 * MB  # o1 redone at 9 for h1


def test_only_a_two_hop_recompute_fits():
    """x (kept, 1 MB) -> y (10 MB, read by nothing in the backward) -> z (10 MB, read at
    10). A 30 MB spike between the forward and step 10 leaves room for neither y nor z:
    only z recomputed from y recomputed from x fits."""
    candidates = (
        Candidate("x", 1 * MB, 5.0, (), 0, 12, 12, True),
        Candidate("y", 10 * MB, 1.0, (0,), 1, 3, 3, False),
        Candidate("z", 10 * MB, 1.0, (1,), 2, 10, 10, True),
    )
    base = [0] * 13
    for step in range(3, 10):
        base[step] = 30 * MB
    problem = Problem(candidates, tuple(base), 3, 40 * MB + MB // 2)
    solution = solve(problem)
    assert solution is not None and solution.actions == (KEEP, RECOMPUTE, RECOMPUTE)
    assert solution.added_ms == pytest.approx(brute_force(problem).added_ms) == 2.0


def random_problem(seed, num_candidates=6):
    """A random DAG of candidates with random sizes, costs, reads and base memory."""
    rng = random.Random(seed)
    forward_steps = num_candidates + 1
    steps = forward_steps + 3 * num_candidates
    candidates = []
    for index in range(num_candidates):
        inputs = tuple(sorted(rng.sample(range(index), k=min(index, rng.randint(0, 2)))))
        needed = rng.random() < 0.7 or index == num_candidates - 1
        first = rng.randrange(forward_steps, steps - 1)
        last = rng.randrange(first, steps)
        candidates.append(
            Candidate(
                f"t{index}", rng.choice([1, 2, 4, 8]) * MB, rng.choice([0.5, 1.0, 3.0]), inputs,
                free_at=min(index + rng.randint(0, 2), forward_steps - 1),
                backward_first_use=first, backward_last_use=last, needed_by_backward=needed,
                can_keep=rng.random() < 0.9,
            )
        )
    base = tuple(rng.choice([0, 0, 4 * MB, 12 * MB]) for _ in range(steps))
    return Problem(tuple(candidates), base, forward_steps, None)


@pytest.mark.parametrize("seed", range(24))
def test_random_dags_match_brute_force(seed):
    """The program's chains of recomputation price exactly what the reference semantics
    does: on random DAGs the least peak and, at a budget between it and keeping
    everything, the least added time agree with enumerating every plan."""
    problem = random_problem(seed)
    least = least_peak(problem)
    plans = [evaluate(problem, actions, "brute") for actions in _valid_plans(problem)]
    assert least.peak_bytes == min(plan.peak_bytes for plan in plans)
    budget = (least.peak_bytes + max(plan.peak_bytes for plan in plans)) // 2
    bounded = dataclasses.replace(problem, budget_bytes=budget)
    solution = solve(bounded)
    assert solution.peak_bytes <= budget
    assert solution.added_ms == pytest.approx(min(p.added_ms for p in plans if p.peak_bytes <= budget))


def _valid_plans(problem):
    for actions in itertools.product([KEEP, RECOMPUTE, DROP], repeat=len(problem.candidates)):
        if not check_actions(problem, actions):
            yield actions


def test_a_start_plan_bounds_what_a_cut_short_solve_returns():
    """A least-peak solve stopped before it found anything answers with its start (here
    checkpointing's cut: every 17th tensor kept, the segments between recomputed), not
    with the greedy fallback's far higher peak."""
    problem = chain_problem(None, num_layers=300, size=2 * MB, cost_ms=0.01)
    start = [KEEP if index % 17 == 0 else RECOMPUTE for index in range(len(problem.candidates))]
    start_peak = max(memory_timeline(problem, start))
    assert greedy(problem).peak_bytes > start_peak
    solution = least_peak(problem, time_limit_s=0.001, start=start)
    assert solution.peak_bytes <= start_peak
    assert solve(dataclasses.replace(problem, budget_bytes=start_peak), time_limit_s=0.001, start=start).peak_bytes <= start_peak
