"""graphopt's configuration: one frozen dataclass, passed explicitly."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .budget import parse_budget
from .cost_models import HardwareProfile, get_hardware
from .errors import GraphoptError, PlanMismatchError
from .ops.apply_update import check_optimizer
from .ops.quantize import FP8
from .passes import check_disabled
from .plan import load_plans
from .trainable import TrainableSpec, parse_trainable

COMPILERS = ("inductor", "eager")
# How a split's peak is predicted: "code" replays the wrapper code Inductor generates for
# it (cost_models/wrapper_memory.py); "simulation" is graphopt's own simulation of the FX
# graphs (cost_models/memory.py), what planning without code generation uses.
PREDICTIONS = ("code", "simulation")
COST_MODELS = ("roofline", "measured")


@dataclasses.dataclass(frozen=True)
class Options:
    memory_budget_bytes: int | None = None
    hardware: HardwareProfile | None = None
    solver_time_limit_s: float = 30.0
    compiler: str = "inductor"  # "eager": no code generation (fast; for tests and planning)
    cost_model: str = "roofline"  # "measured": time each op on the local device (cached)
    verbose: bool = False
    model_static_bytes: int = 0  # parameters and buffers of the whole model, when known
    # What a data-parallel rank holds beside its graphs' inputs, by kind (part of
    # model_static_bytes; RankMemory.reserves): each plan shows them on lines of their own.
    rank_reserves: tuple[tuple[str, int], ...] = ()
    # Gradient accumulation over this many micro-batches (one backward each): the
    # parameters' .grad is alive from every step's start, and with optimizer= the update
    # runs on every k-th backward, from the accumulated gradient (docs/design.md,
    # "Gradients alive between backwards").
    accumulation_steps: int = 1
    # Plan with the parameters' gradients alive from the step's start: accumulation_steps
    # > 1, or a .grad found at a step's start (graphopt.compile then plans again with it).
    resident_gradients: bool = False
    model_gradient_bytes: int = 0  # gradients of the whole model's trainable parameters, when known
    # Count, during each graph's backward, the gradients graphs planned after it leave in
    # .grad (their backwards come first): the model's trainable gradients less this
    # graph's and the earlier graphs'. graphopt.compile sets it where it knows the model
    # and no other line counts them (not under FSDP2, whose gradient shards are static).
    count_later_gradients: bool = False
    # Share of the budget a plan's predicted peak must leave free. With Inductor the
    # prediction replays the wrapper code Inductor generates for the plan's graphs
    # (cost_models/wrapper_memory.py) with the scratch its extern kernels take for
    # themselves (docs/design.md, "Check by Inductor's code"). Without code generation
    # the prediction is the whole model, so no headroom.
    prediction_headroom: float = 0.02
    prediction: str = "code"
    # Lossy saving (docs/offload_quantize.md): the quantized widths the program may
    # choose. () keeps every result exact (the default); allow_lossy=True gives (8, 4, 2),
    # and "fp8" too where the hardware has fp8 units; quantize_bits=b gives (b,).
    quantize_bits: tuple[int | str, ...] = ()
    # Milliseconds the objective charges per unit of expected relative squared error a
    # quantized tensor carries (about 5e-5 at int8, 7e-4 at fp8, 0.017 at int4, 0.8 at int2).
    lossy_error_weight_ms: float = 1000.0
    # Memory-aware reordering of the split graphs (graphopt/passes/reorder_graph.py). Off by
    # default: on a recompute-heavy ViT plan its simulated gain (34 -> 25 MB) was not what
    # Inductor delivered (64 MB measured), which breaks the budget (docs/reorder.md).
    reorder: bool = False
    # Passes of graphopt/passes/ PIPELINE not to run (disable_passes=), by name.
    disabled_passes: frozenset[str] = frozenset()
    # Which parameters train (graphopt/trainable.py); None: all of them.
    trainable: TrainableSpec | None = None
    # optimizer=: a torch.optim.Optimizer whose updates run inside the backward
    # (graphopt/ops/apply_update.py). Compared and keyed by identity.
    optimizer: Any = dataclasses.field(default=None, compare=False)
    # plan=: decisions to apply instead of solving (a saved plan), by graph name:
    # ((graph, made by torch's min-cut, ((decision key, action), ...)), ...).
    given: tuple[tuple[str, bool, tuple[tuple[str, str], ...]], ...] = ()
    # Whether a given plan's predicted peak must fit memory_budget, as a solved plan's does
    # (BudgetInfeasibleError otherwise); False applies it whatever its peak, and says so.
    check_budget: bool = True
    # graphopt plan --fsdp N (offline only): plan one rank of N under per-block FSDP2
    # (passes/shard_parameters.py). graphopt.compile reads FSDP2 from the model instead.
    fsdp_ranks: int | None = None

    def cache_key(self) -> str:
        """Every input of a plan, for Inductor's caches (a changed budget must replan)."""
        hardware = self.hardware.to_json() if self.hardware is not None else None
        return repr(
            (
                self.memory_budget_bytes,
                hardware,
                self.solver_time_limit_s,
                self.model_static_bytes,
                self.rank_reserves,
                self.accumulation_steps,
                self.resident_gradients,
                self.model_gradient_bytes,
                self.count_later_gradients,
                self.prediction_headroom,
                self.prediction,
                self.cost_model,
                self.quantize_bits,
                self.lossy_error_weight_ms,
                self.reorder,
                tuple(sorted(self.disabled_passes)),
                self.trainable,
                _identity(self.optimizer),
                self.given,
                self.check_budget,
                self.fsdp_ranks,
            )
        )


_ACCEPTED = (
    "memory_budget",
    "hardware",
    "solver_time_limit_s",
    "compiler",
    "verbose",
    "model_static_bytes",
    "accumulation_steps",
    "resident_gradients",
    "model_gradient_bytes",
    "prediction_headroom",
    "prediction",
    "cost_model",
    "allow_lossy",
    "quantize_bits",
    "lossy_error_weight_ms",
    "reorder",
    "disable_passes",
    "trainable",
    "optimizer",
    "plan",
    "check_budget",
)
# By (compiler, prediction): what each prediction has missed of measured peaks. The FX
# simulation ran up to 5.8% under on Inductor's code (docs/design.md, "Check by
# simulation"); without code generation it is the whole model.
_DEFAULT_HEADROOM = {("inductor", "code"): 0.02, ("inductor", "simulation"): 0.07, ("eager", "code"): 0.0, ("eager", "simulation"): 0.0}


def make_options(settings: dict[str, Any] | None = None, **overrides: Any) -> Options:
    """Options from user-facing names (``memory_budget="20GB"``, ``hardware="h100"``)."""
    merged = {**(settings or {}), **overrides}
    unknown = sorted(set(merged) - set(_ACCEPTED))
    if unknown:
        raise GraphoptError(f"unknown graphopt option(s) {unknown}; accepted: {list(_ACCEPTED)}")
    hardware = get_hardware(merged.get("hardware", "auto"))
    budget = parse_budget(merged.get("memory_budget"), device_memory_bytes=hardware.memory_bytes)
    compiler = merged.get("compiler", "inductor")
    if compiler not in COMPILERS:
        raise GraphoptError(f"compiler={compiler!r}; choose one of {COMPILERS}")
    time_limit = float(merged.get("solver_time_limit_s", 30.0))
    if not time_limit > 0:
        raise GraphoptError(f"solver_time_limit_s={time_limit} must be positive")
    cost_model = merged.get("cost_model", "roofline")
    if cost_model not in COST_MODELS:
        raise GraphoptError(f"cost_model={cost_model!r}; choose one of {COST_MODELS}")
    prediction = merged.get("prediction", "code" if compiler == "inductor" else "simulation")
    if prediction not in PREDICTIONS:
        raise GraphoptError(f"prediction={prediction!r}; choose one of {PREDICTIONS}")
    accumulation_steps = merged.get("accumulation_steps", 1)
    if not isinstance(accumulation_steps, int) or isinstance(accumulation_steps, bool) or accumulation_steps < 1:
        raise GraphoptError(f"accumulation_steps={accumulation_steps!r} must be a whole number of micro-batches, 1 or more")
    headroom = float(merged.get("prediction_headroom", _DEFAULT_HEADROOM[compiler, prediction]))
    if not 0 <= headroom < 1:
        raise GraphoptError(f"prediction_headroom={headroom} must lie in [0, 1)")
    reorder = bool(merged.get("reorder", False))
    trainable = parse_trainable(merged.get("trainable", "all"))
    optimizer = _checked_optimizer(merged.get("optimizer"))
    disabled = check_disabled(merged.get("disable_passes", ()), {"trainable=": trainable is not None, "optimizer=": optimizer is not None})
    if reorder and "reorder_graph" in disabled:
        raise GraphoptError("reorder=True asks for the reorder_graph pass that disable_passes disables; choose one")
    return Options(
        memory_budget_bytes=budget,
        hardware=hardware,
        solver_time_limit_s=time_limit,
        compiler=compiler,
        verbose=bool(merged.get("verbose", False)),
        model_static_bytes=int(merged.get("model_static_bytes", 0)),
        accumulation_steps=accumulation_steps,
        resident_gradients=_flag("resident_gradients", merged.get("resident_gradients", False)) or accumulation_steps > 1,
        model_gradient_bytes=int(merged.get("model_gradient_bytes", 0)),
        prediction_headroom=headroom,
        prediction=prediction,
        cost_model=cost_model,
        quantize_bits=_lossy_bits(merged.get("allow_lossy", False), merged.get("quantize_bits"), hardware),
        lossy_error_weight_ms=_error_weight(merged.get("lossy_error_weight_ms", 1000.0)),
        reorder=reorder,
        disabled_passes=disabled,
        trainable=trainable,
        optimizer=optimizer,
        given=given_decisions(merged.get("plan")),
        check_budget=_flag("check_budget", merged.get("check_budget", True)),
    )


def given_decisions(plan: Any) -> tuple[tuple[str, bool, tuple[tuple[str, str], ...]], ...]:
    """``plan=`` (a path to JSON that ``graphopt plan --json`` or ``Plan.dumps`` wrote, a
    ``Plan``, or a list of them) as (graph, made by min-cut, ((key, action), ...))."""
    if plan is None:
        return ()
    plans = load_plans(plan)
    for saved in plans:
        if any(not decision.key for decision in saved.decisions):
            raise GraphoptError(f"plan for {saved.graph} has decisions without keys (saved by an older graphopt); plan again")
        _check_torch_release(saved)
    return tuple(
        (p.graph, p.method.startswith("torch-min-cut"), tuple((d.key, d.planned_action) for d in p.decisions))
        for p in plans
    )


def torch_release(version: str) -> str:
    """The feature release of a torch version (``2.13.0+cpu`` -> ``2.13``): what the graphs
    a plan is matched to depend on (decompositions, the partitioner, Inductor's passes)."""
    return ".".join(version.split("+")[0].split(".")[:2])


def _check_torch_release(plan: Any) -> None:
    if torch_release(plan.torch_version) != torch_release(torch.__version__):
        raise PlanMismatchError(
            f"the plan for {plan.graph} was made with torch {plan.torch_version or 'unknown'}, and this is torch "
            f"{torch.__version__}: torch releases change the graphs a plan is matched to. Plan again with this torch "
            "(graphopt plan --json, or graphopt.compile without plan=)"
        )


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise GraphoptError(f"{name}={value!r} must be True or False")
    return value


def _identity(value: Any) -> str | None:
    """A cache key for an object compared by identity (its state is read at run time)."""
    return None if value is None else f"{type(value).__qualname__}@{id(value):x}"


def _checked_optimizer(optimizer: Any) -> Any:
    if optimizer is not None:
        check_optimizer(optimizer)
    return optimizer


_LOSSY_BITS = (8, 4, 2)


def _lossy_bits(allow_lossy: Any, quantize_bits: Any, hardware: HardwareProfile) -> tuple[int | str, ...]:
    """The widths the program may quantize to: none unless the user opts in.

    fp8 is a storage format here (its conversions run on any device, the CPU too), so
    ``quantize_bits="fp8"`` is honoured everywhere; ``allow_lossy`` offers it only where
    the hardware has fp8 units, whose conversions are native instructions rather than
    bit manipulation.
    """
    if quantize_bits is not None:
        choices = (*_LOSSY_BITS, FP8)
        if quantize_bits not in choices:
            raise GraphoptError(f"quantize_bits={quantize_bits!r}; choose one of {choices}, or allow_lossy=True")
        return (FP8,) if quantize_bits == FP8 else (int(quantize_bits),)
    if not isinstance(allow_lossy, bool):
        raise GraphoptError(f"allow_lossy={allow_lossy!r} must be True or False")
    if not allow_lossy:
        return ()
    return (8, FP8, 4, 2) if hardware.has_fp8_units else _LOSSY_BITS


def _error_weight(weight: Any) -> float:
    weight = float(weight)
    if not weight >= 0:
        raise GraphoptError(f"lossy_error_weight_ms={weight} must be >= 0")
    return weight
