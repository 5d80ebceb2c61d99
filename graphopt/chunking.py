"""The chunk decision: whether a graph's head + cross-entropy runs in k chunks of tokens.

An outer choice around the keep/recompute/offload/quantize program: the logits are
needed whole by the loss, so no decision of the program can shrink them; chunking
removes them (passes/chunk_loss.py). The graph is planned as it is first; only when no
plan fits the budget are the recognised regions chunked, k = 2, 4, 8, ... until the
program fits, and the smallest such k wins (more chunks only add time: each reads the
head's weight again and adds to the weight's gradient). The chosen k, what it saves and
what it costs go into the plan (``Plan.chunking``) with the reason.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch.fx as fx

from .budget import format_bytes
from .cost_models.hardware import HardwareProfile
from .errors import BudgetInfeasibleError, ReplanEarlierGraphs
from .passes import DISABLED, DYNAMO, PassRun, in_pipeline_order, run_stage
from .passes.chunk_loss import LossRegion, chunk_loss, find_loss_regions
from .plan import Chunking, Plan
from .planner import Session

# Chunk counts tried, in order, once the graph fits no plan unchunked.
CHUNK_COUNTS = (2, 4, 8, 16, 32, 64)
# A chunk keeps at least this many tokens (fewer would leave the matmuls too thin).
MIN_CHUNK_TOKENS = 16
# Kernels one chunk adds (logits matmul, softmax reductions, gradient, two matmuls, sums).
KERNELS_PER_CHUNK = 8

CHUNK_LOSS = "chunk_loss"  # the pass (graphopt/passes/__init__.py PIPELINE)
CompileGraph = Callable[[fx.GraphModule], Callable]
T = TypeVar("T")


def compile_with_chunking(session: Session, graph_name: str, graph_module: fx.GraphModule, compile_graph: CompileGraph) -> Callable:
    """``compile_graph(graph_module)``, or of a copy with its head + loss chunked when
    the budget needs it (the pipeline's dynamo stage: the chunk_loss pass). Without a
    budget, without a recognised region, or with chunk_loss disabled, the graph is
    compiled as it is, and so is one given a saved plan (made for the graph as it is)."""
    options = session.options
    disabled = CHUNK_LOSS in options.disabled_passes
    planned = options.memory_budget_bytes is not None and graph_name not in session.given and not disabled
    regions = find_loss_regions(graph_module) if planned else []
    decisions: list[Chunking] = []
    if not regions:
        compiled = compile_graph(graph_module)
    else:

        def attempt(chunks: int) -> Callable:
            chunked = [region.loss for region in regions if region.unchunkable is None]

            def chunk(graph: fx.GraphModule):
                return (chunk_loss(graph, dict.fromkeys(chunked, chunks)).graph_module, f"x{chunks}") if chunks > 1 else None

            rewritten, _ = run_stage(DYNAMO, graph_module, {CHUNK_LOSS: chunk}, options.disabled_passes)
            return compile_graph(rewritten)

        compiled, decisions = fit_with_chunking(attempt, lambda: regions, options.hardware)
    for plan in session.plans:  # the plan the graph was just given
        if plan.graph == graph_name:
            session.replace_plan(with_chunking(plan, decisions, disabled=disabled))
    return compiled


def with_chunking(plan: Plan, decisions: Sequence[Chunking], *, disabled: bool) -> Plan:
    """`plan` with its chunk decisions, and the chunk_loss pass among its passes when it
    chunked a region (or was disabled)."""
    chunks = max((decision.chunks for decision in decisions), default=1)
    run = PassRun(CHUNK_LOSS, DISABLED) if disabled else PassRun(CHUNK_LOSS, f"x{chunks}") if chunks > 1 else None
    passes = in_pipeline_order((*plan.passes, run)) if run is not None else plan.passes
    return dataclasses.replace(plan, chunking=tuple(decisions), passes=passes)


def fit_with_chunking(
    attempt: Callable[[int], T], regions_of: Callable[[], Sequence[LossRegion]], hardware: HardwareProfile | None
) -> tuple[T, list[Chunking]]:
    """``attempt(1)`` (the graph as it is), or, when that fits no plan, ``attempt(k)``
    for the fewest chunks k that fits, with the chunk decision for each region.
    `regions_of()` gives the regions once the first attempt has run (an offline trace
    finds them as it goes). Counts stop rising once one no longer lowers the least
    peak (the logits no longer set it). Raises the error of the attempt with the lowest
    least peak, saying what was tried."""
    try:
        result = attempt(1)
    except (BudgetInfeasibleError, ReplanEarlierGraphs) as error:
        unchunked = error
    else:
        return result, [_not_needed(region) for region in regions_of()]
    regions = list(regions_of())
    chunkable = [region for region in regions if region.unchunkable is None]
    if not chunkable:
        raise _with_note(unchunked, regions) from None
    errors: dict[int, Exception] = {1: unchunked}
    for chunks in chunk_counts(chunkable):
        try:
            result = attempt(chunks)
        except (BudgetInfeasibleError, ReplanEarlierGraphs) as error:
            lowest = min(_least_peak(e) for e in errors.values())
            errors[chunks] = error
            if _least_peak(error) >= lowest:
                # More chunks shrink only the logits, which no longer set the least peak:
                # each further count would trace and plan the model again for nothing.
                break
            continue
        decisions = [_chunked(region, chunks, unchunked, hardware) for region in chunkable]
        return result, decisions + [_not_needed(region) for region in regions if region.unchunkable]
    # The lowest least peak of any chunk count (chunks hold the weight's gradient from
    # the forward on, so on a narrow vocabulary fewer chunks, or none, may reach lower).
    least = min(errors, key=lambda chunks: _least_peak(errors[chunks]))
    raise _with_note(errors[least], regions, tried=sorted(errors), least_at=least) from None


def _least_peak(error: Exception) -> float:
    """The least peak an attempt's error reports (a replan request's, of the graph that
    did not fit); infinity where it reports none."""
    least = getattr(error, "least_peak_bytes", None)
    if least is None:
        least = getattr(getattr(error, "cause", None), "least_peak_bytes", None)
    return math.inf if least is None else least


def chunk_counts(regions: Sequence[LossRegion]) -> list[int]:
    """The chunk counts worth trying for `regions`: each chunk keeps MIN_CHUNK_TOKENS."""
    tokens = min(region.tokens for region in regions)
    return [count for count in CHUNK_COUNTS if tokens // count >= MIN_CHUNK_TOKENS]


def chunking_added_ms(region: LossRegion, chunks: int, hardware: HardwareProfile | None) -> float:
    """What computing `region` in `chunks` chunks adds to the step, on the roofline:
    each chunk after the first reads the head's weight twice more (logits and the
    hidden states' gradient) and adds its part of the weight's gradient to a float32
    sum (read and write), and launches its own kernels. The FLOPs are the same."""
    if hardware is None or chunks <= 1:
        return 0.0
    weight_bytes = region.vocab * region.hidden_size * region.weight_dtype.itemsize
    sum_bytes = region.vocab * region.hidden_size * 4
    extra_bytes = (chunks - 1) * (2 * weight_bytes + 3 * sum_bytes)
    return extra_bytes / hardware.memory_bandwidth_bytes_per_s * 1e3 + chunks * KERNELS_PER_CHUNK * hardware.kernel_overhead_ms


def _chunked(region: LossRegion, chunks: int, unchunked: Exception, hardware: HardwareProfile | None) -> Chunking:
    least = getattr(unchunked, "least_peak_bytes", None)
    why = (
        f"unchunked, the least reachable peak is {format_bytes(least)}, over the budget"
        if least is not None
        else "unchunked, no plan fits the budget"
    )
    return Chunking(
        region=region.label,
        chunks=chunks,
        full_bytes=region.logits_bytes,
        chunk_bytes=-(-region.tokens // chunks) * region.vocab * region.logits_dtype.itemsize,
        added_ms=chunking_added_ms(region, chunks, hardware),
        reason=f"{why}; {chunks} is the fewest chunks that fit",
    )


def _not_needed(region: LossRegion) -> Chunking:
    reason = f"not chunked: {region.unchunkable}" if region.unchunkable else "not chunked: the budget is met without it"
    return Chunking(region.label, 1, region.logits_bytes, region.logits_bytes, 0.0, reason)


def _with_note(error: Exception, regions: Sequence[LossRegion], *, tried: Sequence[int] = (1,), least_at: int = 1) -> Exception:
    """`error` with a sentence on the head + loss regions: the chunk counts `tried` and
    the one whose least peak `error` reports, or why a region was not chunked."""
    notes = []
    for region in regions:
        if region.unchunkable:
            notes.append(f"{region.label} ({format_bytes(region.logits_bytes)} of logits) was not chunked: {region.unchunkable}")
        elif len(tried) > 1:
            at = "unchunked" if least_at == 1 else f"in {least_at} chunks"
            counts = f"{tried[1]} chunks" if len(tried) == 2 else f"{tried[1]} to {tried[-1]} chunks"
            notes.append(f"{region.label} was tried whole and in {counts}; the least peak is {at}")
    if not notes or not isinstance(error, BudgetInfeasibleError):
        return error
    return BudgetInfeasibleError(
        f"{error} ({'; '.join(notes)}.)",
        least_peak_bytes=error.least_peak_bytes,
        least_budget_bytes=error.least_budget_bytes,
        breakdown=error.breakdown,
    )
