"""The memory problem as plain data, with no framework in it.

The timeline is the forward's steps ``0 .. num_forward_steps-1`` followed by the
backward's. Memory at step ``t`` is ``base_bytes[t]`` (what no decision changes) plus:

- a saved candidate ``i``: ``size_bytes`` from ``free_at + 1`` (when it would have been
  freed had nobody saved it) through its end (below); a saved view (``storage_of``
  set) holds the buffer it views instead, counted once however many of its views are
  saved, through that buffer's lifetime;
- a recomputed candidate: ``recomputed_size_bytes`` (0 for a pointwise value fused
  into its readers) from its start through its end. Its start
  depends on the other decisions: the backward recomputes a tensor just before the
  first step that needs it, its own first backward read (``backward_first_use``) or the
  recomputation of a tensor recomputed from it, whichever comes first. A chain of
  recomputations (a whole block redone from its kept input, as checkpointing does)
  therefore materialises each link when the next one is redone;
- an alternative (offload, quantize, offload of a quantized copy): the bytes of each of
  its ``intervals``, which the analysis derives from the candidate's lifetime and the
  hardware (see ``Alternative``).

A candidate's end (``last_needed``) is the later of its own last backward read and the
latest step a tensor recomputed from it can be redone at, whatever is decided; a view's
readers count for the buffer it views.

``evaluate`` is the reference semantics; the MILP in ``solver.py`` encodes the same sums.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

KEEP = "keep"
RECOMPUTE = "recompute"
DROP = "drop"  # neither saved nor recomputed: only for tensors the backward does not read
# Alternative kinds: ways to have a tensor in the backward other than keeping it whole.
QUANTIZE = "quantize"  # save a per-group quantized copy, dequantize before first use
OFFLOAD = "offload"  # copy to host memory, prefetch back before first use
OFFLOAD_QUANTIZED = "offload-quantized"  # both: quantize, then offload the small copy
ALTERNATIVE_KINDS = (QUANTIZE, OFFLOAD, OFFLOAD_QUANTIZED)


@dataclasses.dataclass(frozen=True)
class Alternative:
    """One more way to have a candidate in the backward, with what it costs.

    ``intervals`` are ``(first step, last step, bytes)`` of device memory it holds, e.g.
    for a quantized copy: the small copy from the forward to the dequantization, then
    the full tensor from there to the last backward use. ``added_ms`` is the time it
    adds (kernels, un-hidden transfer), ``error`` the expected relative squared error
    it puts into the tensor (0 for exact choices; see docs/offload_quantize.md).
    """

    kind: str
    bits: int | str | None  # quantized width (8, 4, 2) or format ("fp8"); None: full precision
    added_ms: float
    intervals: tuple[tuple[int, int, int], ...]
    error: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ALTERNATIVE_KINDS:
            raise ValueError(f"unknown alternative kind {self.kind!r}; expected one of {ALTERNATIVE_KINDS}")
        if (self.bits is None) != (self.kind == OFFLOAD):
            raise ValueError(f"{self.kind} needs bits exactly when it quantizes")
        for first, last, size in self.intervals:
            if first > last or size < 0:
                raise ValueError(f"bad interval ({first}, {last}, {size}) in {self.action}")

    @property
    def action(self) -> str:
        """The action string a ``Solution`` carries: ``"offload"``, ``"quantize:8"``, ``"quantize:fp8"``, ..."""
        return self.kind if self.bits is None else f"{self.kind}:{self.bits}"


def parse_action(action: str) -> tuple[str, int | str | None]:
    """``"quantize:8"`` -> ``("quantize", 8)``; ``"quantize:fp8"`` -> ``("quantize", "fp8")``;
    ``"keep"`` -> ``("keep", None)``. A width is a bit count, anything else a format's name."""
    kind, _, bits = action.partition(":")
    if not bits:
        return kind, None
    return kind, int(bits) if bits.isdigit() else bits


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A forward tensor the backward reads, or one the backward could recompute it from."""

    name: str
    size_bytes: int
    recompute_ms: float
    inputs: tuple[int, ...]  # candidates the producer reads (graph inputs are always available)
    free_at: int  # last forward step it is alive if not saved
    # First and last step of the backward reads of it (through views of it too); only
    # meaningful when ``needed_by_backward``: a pure ancestor is needed only by what is
    # recomputed from it.
    backward_first_use: int
    backward_last_use: int
    needed_by_backward: bool  # read by a backward op: it must be kept or recomputed
    can_recompute: bool = True
    can_keep: bool = True
    alternatives: tuple[Alternative, ...] = ()
    # A view (``unbind``'s q, k, v) allocates nothing, but saving it keeps the buffer it
    # views alive: the index of the candidate owning that buffer, whose size and lifetime
    # a kept view is charged (once per buffer). None: the candidate owns its bytes, or
    # views memory no decision frees (a parameter).
    storage_of: int | None = None
    # Bytes it holds when recomputed, if not ``size_bytes``: a pointwise value whose
    # possible backward readers are all pointwise is computed inside their kernel and
    # never stored.
    recomputed_bytes: int | None = None

    @property
    def recomputed_size_bytes(self) -> int:
        return self.size_bytes if self.recomputed_bytes is None else self.recomputed_bytes

    def __post_init__(self) -> None:
        if not self.can_keep and not self.can_recompute and not self.alternatives and self.needed_by_backward:
            raise ValueError(f"candidate {self.name} can be neither kept nor recomputed")
        if self.backward_first_use > self.backward_last_use:
            raise ValueError(f"candidate {self.name}: first backward use after last use")

    def alternative(self, action: str) -> Alternative | None:
        return next((a for a in self.alternatives if a.action == action), None)


@dataclasses.dataclass(frozen=True)
class Problem:
    candidates: tuple[Candidate, ...]
    base_bytes: tuple[int, ...]  # memory at each step that no decision changes
    num_forward_steps: int
    budget_bytes: int | None  # None: no constraint (used to find the least peak)
    # Milliseconds the objective charges per unit of an alternative's ``error``.
    error_weight_ms: float = 0.0

    @property
    def num_steps(self) -> int:
        return len(self.base_bytes)

    @functools.cached_property
    def readers(self) -> tuple[tuple[int, ...], ...]:
        """Per candidate, the candidates whose producer reads it (which come later)."""
        readers: list[list[int]] = [[] for _ in self.candidates]
        for index, candidate in enumerate(self.candidates):
            for source in candidate.inputs:
                readers[source].append(index)
        return tuple(tuple(r) for r in readers)

    @functools.cached_property
    def latest_redo(self) -> tuple[int | None, ...]:
        """Per candidate, the latest step its recomputation can be needed at, whatever
        is decided: its own first backward read, or for a pure ancestor the latest of
        its readers'; None when nothing could ever need it recomputed."""
        latest: list[int | None] = [None] * len(self.candidates)
        for index in reversed(range(len(self.candidates))):
            candidate = self.candidates[index]
            if candidate.needed_by_backward:
                latest[index] = candidate.backward_first_use
                continue
            steps = [latest[r] for r in self.readers[index] if latest[r] is not None and self.candidates[r].can_recompute]
            latest[index] = max(steps, default=None)
        return tuple(latest)

    @functools.cached_property
    def last_needed(self) -> tuple[int, ...]:
        """Per candidate, the last step it is alive at when kept or recomputed: its own
        last backward read, the latest a reader can be recomputed at, and the end of any
        view of it recomputed from it (the view's readers read this buffer)."""
        ends = [0] * len(self.candidates)
        for index in reversed(range(len(self.candidates))):
            candidate = self.candidates[index]
            steps = [candidate.backward_last_use] if candidate.needed_by_backward else [self.num_forward_steps]
            for reader in self.readers[index]:
                if self.latest_redo[reader] is not None and self.candidates[reader].can_recompute:
                    steps.append(self.latest_redo[reader])
                if self.candidates[reader].storage_of == index:
                    steps.append(ends[reader])
            ends[index] = max(steps)
        return tuple(ends)


@dataclasses.dataclass(frozen=True)
class Solution:
    actions: tuple[str, ...]  # KEEP / RECOMPUTE / DROP or an alternative's action, per candidate
    peak_bytes: int
    added_ms: float
    method: str  # "milp-optimal", "milp-time-limit", "milp-start" (the plan it began from), "greedy"
    solve_s: float = 0.0
    error: float = 0.0  # summed expected relative squared error of the lossy choices


def storage_holder(problem: Problem, index: int) -> int:
    """The candidate whose bytes and lifetime keeping candidate ``index`` holds."""
    owner = problem.candidates[index].storage_of
    return index if owner is None else owner


def redo_ms(problem: Problem, index: int) -> float:
    """Time to redo candidate `index` in the backward: its own op and the storage-less
    ones it reads (a tuple-returning op such as attention, whose outputs' getitems cost
    nothing themselves), which must be redone with it."""
    seen, pending, total = {index}, [index], 0.0
    while pending:
        candidate = problem.candidates[pending.pop()]
        total += candidate.recompute_ms
        for source in candidate.inputs:
            if source not in seen and problem.candidates[source].size_bytes == 0:
                seen.add(source)
                pending.append(source)
    return total


def recompute_starts(problem: Problem, actions: Sequence[str]) -> list[int | None]:
    """The step each recomputed candidate is redone at (None for the others): just
    before its own first backward read or the redoing of a tensor recomputed from it,
    whichever comes first."""
    starts: list[int | None] = [None] * len(problem.candidates)
    for index in reversed(range(len(problem.candidates))):
        if actions[index] != RECOMPUTE:
            continue
        candidate = problem.candidates[index]
        steps = [candidate.backward_first_use] if candidate.needed_by_backward else []
        steps += [starts[r] for r in problem.readers[index] if starts[r] is not None]
        # A recomputed tensor nothing reads is not redone at all (the split drops it).
        starts[index] = min(steps, default=None)
    return starts


def memory_deltas(problem: Problem, actions: Sequence[str]) -> list[int]:
    """Change of decision-dependent memory at each step (index num_steps = past the end)."""
    delta = [0] * (problem.num_steps + 1)
    held = {storage_holder(problem, i) for i, action in enumerate(actions) if action == KEEP}
    for index in held:
        candidate = problem.candidates[index]
        delta[candidate.free_at + 1] += candidate.size_bytes
        delta[problem.last_needed[index] + 1] -= candidate.size_bytes
    for index, start in enumerate(recompute_starts(problem, actions)):
        if start is not None:
            size = problem.candidates[index].recomputed_size_bytes
            delta[start] += size
            delta[problem.last_needed[index] + 1] -= size
    for candidate, action in zip(problem.candidates, actions):
        if action not in (KEEP, DROP, RECOMPUTE):
            for first, last, held_bytes in candidate.alternative(action).intervals:
                delta[first] += held_bytes
                delta[last + 1] -= held_bytes
    return delta


def memory_timeline(problem: Problem, actions: Sequence[str]) -> list[int]:
    """Predicted bytes in use at every step."""
    running, timeline = 0, []
    for step, delta in enumerate(memory_deltas(problem, actions)[: problem.num_steps]):
        running += delta
        timeline.append(problem.base_bytes[step] + running)
    return timeline


def check_actions(problem: Problem, actions: Sequence[str]) -> list[str]:
    """Violated rules (empty when the actions are a valid plan).

    An offloaded or quantized tensor is available in the backward (prefetched or
    dequantized before its window), so a recomputation may read it.
    """
    errors = []
    for index, (candidate, action) in enumerate(zip(problem.candidates, actions)):
        if action == DROP and candidate.needed_by_backward:
            errors.append(f"{candidate.name} is read by the backward but neither kept nor recomputed")
        if action == KEEP and not candidate.can_keep:
            errors.append(f"{candidate.name} may not be kept")
        if action not in (KEEP, RECOMPUTE, DROP) and candidate.alternative(action) is None:
            errors.append(f"{candidate.name} may not be {action}")
        if action == RECOMPUTE:
            if not candidate.can_recompute:
                errors.append(f"{candidate.name} may not be recomputed")
            for input_index in candidate.inputs:
                if actions[input_index] == DROP:
                    errors.append(f"{candidate.name} is recomputed but its input {problem.candidates[input_index].name} is gone")
    return errors


def action_ms(candidate: Candidate, action: str) -> float:
    """Time the action adds to the step."""
    if action == RECOMPUTE:
        return candidate.recompute_ms
    if action in (KEEP, DROP):
        return 0.0
    return candidate.alternative(action).added_ms


def action_error(candidate: Candidate, action: str) -> float:
    alternative = candidate.alternative(action) if action not in (KEEP, RECOMPUTE, DROP) else None
    return alternative.error if alternative is not None else 0.0


def evaluate(problem: Problem, actions: Sequence[str], method: str, solve_s: float = 0.0) -> Solution:
    errors = check_actions(problem, actions)
    if errors:
        raise ValueError("invalid plan: " + "; ".join(errors[:5]))
    added_ms = sum(action_ms(c, a) for c, a in zip(problem.candidates, actions))
    error = sum(action_error(c, a) for c, a in zip(problem.candidates, actions))
    return Solution(tuple(actions), max(memory_timeline(problem, actions)), added_ms, method, solve_s, error)
