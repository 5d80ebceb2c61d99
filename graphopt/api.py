"""What users call: ``graphopt.compile`` and ``graphopt.plans``."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import torch

from .backend import GraphoptBackend
from .config import Options, make_options
from .distributed import fsdp_units, is_ddp, local_bytes, rank_memory
from . import torch_private
from .budget import format_bytes
from .errors import BudgetInfeasibleError, GraphoptError, ReplanEarlierGraphs, ShapeAbovePlanError
from .ops.apply_update import refuse_under_ddp
from .plan import Plan
from .repeats import graph_runs
from .trainable import select_parameters

_SESSION_ATTRIBUTE = "_graphopt_backend"
# Times one call may replan the graphs before a graph break (each leaves more room):
# at least MAX_REPLANS, and REPLANS_PER_GRAPH for each graph the step has shown so far.
# A request is answered one graph at a time (the later graphs are traced only once the
# earlier ones run), so a step broken before each of n blocks asks about n - 1 times.
MAX_REPLANS = 4
REPLANS_PER_GRAPH = 2

log = logging.getLogger("graphopt")


def compile(  # noqa: A001 - mirrors torch.compile
    model: torch.nn.Module | Any,
    *,
    memory_budget: int | float | str | None = None,
    hardware: Any = "auto",
    solver_time_limit_s: float = 30.0,
    fullgraph: bool = False,
    dynamic: bool | None = None,
    compiler: str = "inductor",
    prediction: str | None = None,
    cost_model: str = "roofline",
    reorder: bool = False,
    disable_passes: Sequence[str] = (),
    trainable: Any = "all",
    optimizer: torch.optim.Optimizer | None = None,
    accumulation_steps: int = 1,
    allow_lossy: bool = False,
    quantize_bits: int | str | None = None,
    lossy_error_weight_ms: float = 1000.0,
    plan: Any = None,
    check_budget: bool = True,
    verbose: bool = False,
) -> Any:
    """Compile `model` for training so one step's peak memory stays under `memory_budget`.

    Returns what ``torch.compile`` returns; use it exactly as the model. The budget is the
    peak of a whole training step (parameters, buffers, gradients, activations,
    temporaries), as ``torch.cuda.max_memory_allocated`` reports it: ``"20GB"``,
    ``"20 GiB"``, ``"512MB"``, ``"1.5e9"``, an int of bytes, or ``"80%"`` of the device.
    Without a budget graphopt uses torch's own cut and only reports the plan.

    ``compiler="eager"`` skips code generation (the graphs run as Python): fast to
    compile, for checking plans and gradients; it does not free memory early.
    ``prediction`` says how a split's peak is predicted: ``"code"`` (the default with
    Inductor) replays the wrapper code Inductor generates for it; ``"simulation"`` (the
    default without code generation, and what ``graphopt plan`` uses) is graphopt's own
    simulation of the FX graphs.
    ``cost_model="measured"`` prices recomputation by timing each op on this machine
    (cached in ~/.cache/graphopt) instead of the hardware profile's roofline.
    ``reorder=True`` reorders each graph for a lower simulated peak where that beats
    Inductor's heuristics, and judges plans on the reordered graphs; off by default,
    since Inductor does not always deliver the simulated gain (docs/reorder.md).
    ``disable_passes=["hoist_prefetches"]`` skips graph passes by name
    (``graphopt.passes.PIPELINE`` lists them in order, with what each does); each plan
    lists the passes that ran on its graph. ``lower_saves`` disabled leaves the program
    keep or recompute only; a pass that carries out ``trainable=`` or ``optimizer=``
    cannot be disabled while that option is set.
    ``trainable`` picks what fine-tuning trains: ``"all"``, ``"bias"``, glob patterns of
    parameter names, ``{"last_blocks": k}``, or ``{pattern: fraction}`` for the first
    fraction of a weight's output channels; the rest gets no gradient and the backward
    work only it needed is pruned (docs/sparse.md). The model's ``requires_grad`` flags
    are left as they are.
    ``optimizer=opt`` runs each parameter's ``opt`` update inside the backward, as soon
    as its gradient is complete, and frees the gradient at once: the training loop is
    ``loss = cm(x); loss.backward()``, with no ``opt.step()`` or ``zero_grad()``
    (docs/optimizer_in_backward.md).
    ``accumulation_steps=k`` says each step accumulates gradients over k micro-batches
    (``loss.backward()`` k times, then ``opt.step()``): every plan counts the parameters'
    ``.grad`` as alive from the step's start, and with ``optimizer=`` the update runs on
    every k-th backward from the accumulated gradient. Without it, a ``.grad`` found
    when a step starts (under a budget) makes graphopt plan every graph again with the
    gradients counted (one recompilation).
    ``allow_lossy=True`` lets the planner save tensors quantized to 8, 4 or 2 bits, and
    fp8 (float8_e4m3fn) on hardware with fp8 units (chosen per tensor; each expected
    error is charged ``lossy_error_weight_ms`` ms per unit of relative squared error and
    reported in the plan); ``quantize_bits=8`` (or 4, 2, ``"fp8"``) allows that width
    only. By default every result is exact (docs/offload_quantize.md).
    ``plan=`` applies a saved plan instead of solving: a path to the JSON that
    ``graphopt plan --json`` or ``Plan.dumps()`` wrote, a ``Plan`` or a list of them
    (from ``graphopt.plans``). Decisions are matched to tensors by module path, op, dtype
    and shape; a plan that lacks a tensor this graph's backward needs, or was made for
    another model, other shapes or dtypes, or another torch release, raises
    ``PlanMismatchError`` saying what differs. A given plan's peak is predicted and
    checked against ``memory_budget`` like a solved one (``BudgetInfeasibleError`` when
    over); ``check_budget=False`` applies it anyway, and the plan's assumptions say so.
    ``verbose=True`` prints the planning progress to stderr (each graph's reference
    peak, every solve round and sweep point with the budget it tried and the time so
    far); without it the same lines go to the ``graphopt`` logger at INFO. Whatever
    graphopt assumed where it could not know (an op priced without a FLOP formula, a
    peak predicted without Inductor's code) is logged once at WARNING and listed in
    ``plan.assumptions``.
    """
    options = make_options(
        memory_budget=memory_budget,
        hardware=hardware,
        solver_time_limit_s=solver_time_limit_s,
        compiler=compiler,
        **({"prediction": prediction} if prediction is not None else {}),
        cost_model=cost_model,
        reorder=reorder,
        disable_passes=disable_passes,
        trainable=trainable,
        optimizer=optimizer,
        accumulation_steps=accumulation_steps,
        allow_lossy=allow_lossy,
        quantize_bits=quantize_bits,
        lossy_error_weight_ms=lossy_error_weight_ms,
        plan=plan,
        check_budget=check_budget,
        verbose=verbose,
        model_static_bytes=_static_bytes(model),
    )
    if is_ddp(model):
        refuse_under_ddp(options.optimizer)
    options = dataclasses.replace(
        options,
        rank_reserves=rank_memory(model).reserves(),
        model_gradient_bytes=_gradient_bytes(model, options),
        count_later_gradients=isinstance(model, torch.nn.Module) and not fsdp_units(model),
    )
    backend = _backend(options, model)
    compiled = torch.compile(model, backend=backend, fullgraph=fullgraph, dynamic=dynamic)
    object.__setattr__(compiled, _SESSION_ATTRIBUTE, backend)
    if isinstance(model, torch.nn.Module):
        _replan_on_request(compiled, model, fullgraph=fullgraph, dynamic=dynamic)
    if is_ddp(model):
        _one_graph_under_ddp(compiled)
    return compiled


def _one_graph_under_ddp(compiled: torch.nn.Module) -> None:
    """Have Dynamo compile a DDP model as one graph, which graphopt plans whole against
    the budget: without this its DDPOptimizer splits the graph at every gradient bucket,
    and graphopt would plan the pieces one after another (docs/distributed.md). DDP's
    reducer then all-reduces the buckets after the backward instead of during it."""
    forward = torch_private.compiled_forward(compiled)

    def one_graph_forward(*args: Any, **kwargs: Any) -> Any:
        with torch_private.one_graph_under_ddp():
            return forward(*args, **kwargs)

    torch_private.set_compiled_forward(compiled, one_graph_forward)


def _replan_on_request(compiled: torch.nn.Module, model: torch.nn.Module, **compile_kwargs: Any) -> None:
    """Rerun a call whose later graph (after a graph break) asked for the earlier ones
    to be planned again (``ReplanEarlierGraphs``), with a fresh backend leaving the room
    it asked for. The failed call ran only forwards, whose saved tensors are dropped
    with the exception; Dynamo compiles every graph again for the new backend.

    Under a budget a frame Dynamo will not compile again (its recompile limit, which
    every replan's compile counts against) raises instead of running outside every plan
    (`torch_private.only_compiled_frames`). A frame Dynamo ran eagerly because it could
    not compile it (`torch_private.frames_run_uncompiled`) is warned about and named in
    every plan's assumptions (`_ran_eagerly`); a call of which nothing was compiled raises.
    """
    forward = torch_private.compiled_forward(compiled)
    trained = [parameter for parameter in model.parameters() if parameter.requires_grad]
    replans = 0

    def replan(backend: GraphoptBackend) -> None:
        nonlocal forward, replans
        forward = torch_private.compiled_forward(torch.compile(model, backend=backend, **compile_kwargs))
        object.__setattr__(compiled, _SESSION_ATTRIBUTE, backend)
        replans += 1

    def call(*args: Any, **kwargs: Any) -> Any:
        session = getattr(compiled, _SESSION_ATTRIBUTE).session
        if session.options.memory_budget_bytes is None:
            return forward(*args, **kwargs)
        open_before = set(session.open_runs)
        try:
            with torch_private.only_compiled_frames(replans), torch_private.frames_run_uncompiled() as uncompiled:
                result = forward(*args, **kwargs)
            if uncompiled and not session.plans:
                raise GraphoptError(f"{_ran_eagerly(uncompiled)}. Nothing of this step was compiled, so nothing is planned.")
            if uncompiled:
                session.assume(_ran_eagerly(uncompiled))
            return result
        except Exception as error:
            # The failed call's forwards will see no backward: the next call may run them again.
            session.abandon_runs(open_before)
            if not torch_private.recompile_limit_hit(error):
                raise
            raise GraphoptError(
                f"Dynamo reached its recompile limit ({torch_private.recompile_limit()} per frame, times "
                f"{replans + 1} for graphopt's {replans} replan(s) of this model) on a frame of this step, and would "
                "run it uncompiled, outside every plan, where the budget does not hold. Frames recompile for each "
                f"new shape and failed guard; raise {torch_private.RECOMPILE_LIMIT_SETTING}, or make the shapes static."
            ) from error

    def replanning_forward(*args: Any, **kwargs: Any) -> Any:
        backend = getattr(compiled, _SESSION_ATTRIBUTE)
        if _needs_resident_gradients(backend.session.options, trained):
            # Before any forward runs: gradient accumulation, whose .grad the plans left out.
            log.info("a parameter has a .grad as the step starts (gradient accumulation?); planning every "
                     "graph again with the gradients alive from the step's start")
            replan(backend.with_resident_gradients())
        backend = getattr(compiled, _SESSION_ATTRIBUTE)
        rooms = backend.session.rooms_after_first_step()
        if rooms is not None:
            # The first step ran with each graph at a graph break leaving the most room it
            # could for the graphs after it; they left some unused: plan and compile again.
            log.info("the first step's graphs after a graph break left room unused; planning every graph again "
                     "with the earlier graphs keeping more (%s)",
                     ", ".join(f"{graph} leaves {format_bytes(room)}" for graph, room in rooms.items()))
            replan(backend.replanned(rooms))
        # What the call's forwards write in place and the RNG, put back if the call must run again.
        writes = backend.writes
        writes.call_starts()
        try:
            return attempt_call(args, kwargs)
        finally:
            writes.call_ends()

    def attempt_call(args: tuple, kwargs: dict) -> Any:
        graphs, attempts = 0, 0  # the most graphs one attempt of this call planned or asked about; replans
        while True:
            backend = getattr(compiled, _SESSION_ATTRIBUTE)
            session = backend.session
            forward_runs = session.forward_runs
            try:
                return call(*args, **kwargs)
            except ReplanEarlierGraphs as request:
                graphs = max(graphs, len(session.plans) + 1)
                if attempts >= max(MAX_REPLANS, REPLANS_PER_GRAPH * graphs):
                    raise _replans_exhausted(request, attempts) from request
                log.info("%s; planning every graph again", request)
                backend.writes.undo()  # the earlier graphs' forwards ran: the rerun changes their writes once
                replan(backend.replanned(request.room_after))
            except ShapeAbovePlanError as error:
                if session.forward_runs != forward_runs:  # a graph of this call ran: rerunning would repeat it
                    raise
                if attempts >= max(MAX_REPLANS, REPLANS_PER_GRAPH * graphs):
                    raise
                log.info("%s; planning every graph again at this call's sizes", error)
                backend.writes.undo()
                replan(backend.replanned(session.room_after))
            attempts += 1

    torch_private.set_compiled_forward(compiled, replanning_forward)


def _ran_eagerly(frames: list[str]) -> str:
    """What a step with frames Dynamo could not compile assumes: their tensors are
    outside every plan."""
    return (
        f"Dynamo could not compile {', '.join(frames)} and runs it eagerly: the tensors its own code makes "
        "(those of the modules it calls are planned, where Dynamo compiles them) are outside every plan, so the "
        "measured peak can exceed memory_budget by them. The usual cause is a graph break inside a for/while loop, "
        "which makes Dynamo skip the whole frame: move it out of the loop (fullgraph=True finds it)"
    )


def _replans_exhausted(request: ReplanEarlierGraphs, replans: int) -> BudgetInfeasibleError:
    """The budget error for a step whose graphs, replanned `replans` times, still do not
    fit together: the last graph that did not fit, with its own least peak beside what
    the earlier graphs kept in the last attempt."""
    cause = request.cause
    return BudgetInfeasibleError(
        f"the step's graphs (Dynamo broke it into several) do not fit the budget together: after {replans} replans "
        f"of the earlier graphs, {request.graph} still needs {format_bytes(request.need_bytes)} beside what they keep. "
        f"Planned beside them, its least peak is {format_bytes(cause.least_peak_bytes)} (a budget of "
        f"{format_bytes(cause.least_budget_bytes)}); fewer graph breaks let graphopt plan the step as one graph. "
        f"{request.graph}'s own error: {cause}",
        least_peak_bytes=cause.least_peak_bytes,
        least_budget_bytes=cause.least_budget_bytes,
        breakdown=cause.breakdown,
    )


def _needs_resident_gradients(options: Options, trained: list[torch.Tensor]) -> bool:
    """Whether a step starts with a ``.grad`` its budgeted plans left out."""
    if options.memory_budget_bytes is None or options.resident_gradients or not torch.is_grad_enabled():
        return False
    return any(parameter.grad is not None for parameter in trained)


def _backend(options: Options, model: Any) -> GraphoptBackend:
    """The backend; with ``trainable=`` on a module, checked against all its parameters."""
    runs = graph_runs(model)
    if options.trainable is None or not isinstance(model, torch.nn.Module):
        return GraphoptBackend(options, graph_runs=runs)
    selection = select_parameters(options.trainable, model)
    return GraphoptBackend(options, parameters=dict(model.named_parameters()), selection=selection, graph_runs=runs)


def plans(compiled: Any) -> list[Plan]:
    """The plans graphopt made for a compiled model, one per captured graph (after a first call)."""
    backend = getattr(compiled, _SESSION_ATTRIBUTE, None)
    if backend is None:
        raise GraphoptError("this object was not made by graphopt.compile; compile the model with graphopt.compile(...)")
    return list(backend.session.plans)


def _gradient_bytes(model: Any, options: Options) -> int:
    """Bytes of the gradients of the model's trainable parameters: what ``.grad`` holds
    between the micro-batches of an accumulated step (under FSDP2, this rank's shards)."""
    if not isinstance(model, torch.nn.Module):
        return 0
    selected = select_parameters(options.trainable, model) if options.trainable is not None else None
    return sum(
        local_bytes(parameter)
        for name, parameter in model.named_parameters()
        if parameter.requires_grad and (selected is None or selected.get(name, 0) > 0)
    )


def _static_bytes(model: Any) -> int:
    """Bytes this rank holds for the model: its parameters and buffers (each storage
    once; an FSDP2 parameter's local shard), and under DDP or FSDP2 what they hold
    besides (graphopt/distributed.py)."""
    return rank_memory(model).total_bytes
