"""The keep/recompute problem as plain data, with no framework in it.

The timeline is the forward's steps ``0 .. num_forward_steps-1`` followed by the
backward's. Memory at step ``t`` is ``base_bytes[t]`` (what no decision changes) plus:

- a saved candidate ``i``: ``size_bytes`` from ``free_at + 1`` (when it would have been
  freed had nobody saved it) through ``backward_last_use``;
- a recomputed candidate: ``size_bytes`` from ``backward_first_use`` (recomputed just
  before it is first needed) through ``backward_last_use``.

``evaluate`` is the reference semantics; the MILP in ``solver.py`` encodes the same sums.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

KEEP = "keep"
RECOMPUTE = "recompute"
DROP = "drop"  # neither saved nor recomputed: only for tensors the backward does not read


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A forward tensor the backward reads, or one the backward could recompute it from."""

    name: str
    size_bytes: int
    recompute_ms: float
    inputs: tuple[int, ...]  # candidates the producer reads (graph inputs are always available)
    free_at: int  # last forward step it is alive if not saved
    backward_first_use: int
    backward_last_use: int
    needed_by_backward: bool  # read by a backward op: it must be kept or recomputed
    can_recompute: bool = True
    can_keep: bool = True

    def __post_init__(self) -> None:
        if not self.can_keep and not self.can_recompute and self.needed_by_backward:
            raise ValueError(f"candidate {self.name} can be neither kept nor recomputed")
        if self.backward_first_use > self.backward_last_use:
            raise ValueError(f"candidate {self.name}: first backward use after last use")


@dataclasses.dataclass(frozen=True)
class Problem:
    candidates: tuple[Candidate, ...]
    base_bytes: tuple[int, ...]  # memory at each step that no decision changes
    num_forward_steps: int
    budget_bytes: int | None  # None: no constraint (used to find the least peak)

    @property
    def num_steps(self) -> int:
        return len(self.base_bytes)


@dataclasses.dataclass(frozen=True)
class Solution:
    actions: tuple[str, ...]  # one of KEEP / RECOMPUTE / DROP per candidate
    peak_bytes: int
    added_ms: float
    method: str  # "milp-optimal", "milp-time-limit", "greedy", ...
    solve_s: float = 0.0


def memory_deltas(problem: Problem, actions: Sequence[str]) -> list[int]:
    """Change of decision-dependent memory at each step (index num_steps = past the end)."""
    delta = [0] * (problem.num_steps + 1)
    for candidate, action in zip(problem.candidates, actions):
        size = candidate.size_bytes
        if action == KEEP:
            delta[candidate.free_at + 1] += size
            delta[candidate.backward_last_use + 1] -= size
        elif action == RECOMPUTE:
            delta[candidate.backward_first_use] += size
            delta[candidate.backward_last_use + 1] -= size
    return delta


def memory_timeline(problem: Problem, actions: Sequence[str]) -> list[int]:
    """Predicted bytes in use at every step."""
    running, timeline = 0, []
    for step, delta in enumerate(memory_deltas(problem, actions)[: problem.num_steps]):
        running += delta
        timeline.append(problem.base_bytes[step] + running)
    return timeline


def check_actions(problem: Problem, actions: Sequence[str]) -> list[str]:
    """Violated rules (empty when the actions are a valid plan)."""
    errors = []
    for index, (candidate, action) in enumerate(zip(problem.candidates, actions)):
        if action == DROP and candidate.needed_by_backward:
            errors.append(f"{candidate.name} is read by the backward but neither kept nor recomputed")
        if action == KEEP and not candidate.can_keep:
            errors.append(f"{candidate.name} may not be kept")
        if action == RECOMPUTE:
            if not candidate.can_recompute:
                errors.append(f"{candidate.name} may not be recomputed")
            for input_index in candidate.inputs:
                if actions[input_index] == DROP:
                    errors.append(f"{candidate.name} is recomputed but its input {problem.candidates[input_index].name} is gone")
    return errors


def evaluate(problem: Problem, actions: Sequence[str], method: str, solve_s: float = 0.0) -> Solution:
    errors = check_actions(problem, actions)
    if errors:
        raise ValueError("invalid plan: " + "; ".join(errors[:5]))
    added_ms = sum(c.recompute_ms for c, a in zip(problem.candidates, actions) if a == RECOMPUTE)
    return Solution(tuple(actions), max(memory_timeline(problem, actions)), added_ms, method, solve_s)
