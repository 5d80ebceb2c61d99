"""Plan a training step without running it: ``plan_model`` traces on fake tensors.

    with torch.device("meta"):            # no memory for weights or activations
        model = MyModel(); batch = torch.zeros(8, 4096, dtype=torch.long)
    plans = graphopt.offline.plan_model(model, (batch,), memory_budget="60GB", hardware="h100")

The model's forward (and ``loss_fn``) and its backward are traced once with AOTAutograd,
as ``torch.compile`` would trace them, on fake tensors; graphopt's planner then decides
on the joint graph exactly as it does inside ``graphopt.compile``. Real weights work too:
they are read for their shapes only and moved nowhere.

Meta tensors are planned as tensors of the hardware profile's device type when this
process can see such a device, and as CPU tensors otherwise (a CPU-only build of torch
cannot trace CUDA tensors). Sizes, and so the memory plan, are the same either way; ops
whose kernel choice depends on the device (attention) follow the device planned on.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
import os
import sys
import sysconfig
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import torch
import torch.fx as fx

from . import torch_private
from .chunking import CHUNK_LOSS, fit_with_chunking, with_chunking
from .blocks import TRACED_BLOCKS, ComposedPlanner, find_repeated_blocks, identical_blocks, with_blocks
from .config import Options, make_options
from .cost_models import HardwareProfile
from .distributed import RankMemory
from .errors import GraphoptError
from .ops.fsdp import shard_shape
from .passes import check_disabled
from .passes.chunk_loss import ChunkLossMode, LossRegion
from .passes.shard_parameters import GraphSharding
from .plan import Plan
from .planner import GivenPlan, Session, partition
from .trainable import graph_trainable, select_parameters

GRAPH_NAME = "graph_0"
LossFn = Callable[[Any], torch.Tensor]
T = TypeVar("T")

# Frames from these directories are not the user's model code (site-packages may lie
# inside the standard library's directory, and a model from there is the user's).
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_GRAPHOPT_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_STDLIB_DIR = sysconfig.get_paths()["stdlib"] + os.sep
_PACKAGE_DIR_NAMES = ("site-packages", "dist-packages")


def plan_model(
    model: torch.nn.Module,
    example_inputs: Sequence[Any] | Mapping[str, Any],
    *,
    memory_budget: int | float | str | None = None,
    hardware: Any = "auto",
    loss_fn: LossFn | None = None,
    solver_time_limit_s: float = 30.0,
    fsdp: int | None = None,
) -> list[Plan]:
    """The plans graphopt would make for one training step of `model`, without running it.

    `example_inputs` are the model's positional arguments (a tuple) or keyword arguments
    (a dict); tensors among them may be meta tensors. The step's loss is
    ``loss_fn(model(*example_inputs))`` when `loss_fn` is given, else the model's output
    (a tensor, an output with a ``.loss``, or the first element of a tuple); a non-scalar
    output is backpropagated with a gradient of its shape. `memory_budget` and `hardware`
    mean what they mean for ``graphopt.compile`` (a budget in ``"80%"`` is the profile's
    memory). With `fsdp` (N ranks) the plan is one rank's under per-block FSDP2
    (``fsdp_rank_memory``; `example_inputs` are that rank's batch) and the budget is per
    rank. Raises ``BudgetInfeasibleError`` when nothing fits.
    """
    options = options_for(
        model, fsdp=fsdp, memory_budget=memory_budget, hardware=hardware, solver_time_limit_s=solver_time_limit_s
    )
    return plan_chunked(
        options,
        lambda chunks, regions: with_traced_step(
            model, example_inputs, lambda step: step.plan(options), device=planning_device(options.hardware),
            loss_fn=loss_fn, chunks=chunks, loss_regions=regions,
        ),
    )  # fmt: skip


def plan_chunked(options: Options, trace_and_plan: Callable[[int, list[LossRegion]], list[Plan]]) -> list[Plan]:
    """``trace_and_plan(chunks, loss_regions)``'s plans with the head + cross-entropy
    whole, or, under a budget that no such plan meets, in the fewest chunks that meet
    it (graphopt/chunking.py); the plans say which and why."""
    disabled = CHUNK_LOSS in options.disabled_passes
    if options.memory_budget_bytes is None or disabled:
        return [with_chunking(plan, (), disabled=disabled) for plan in trace_and_plan(1, [])]
    found: list[LossRegion] = []
    plans, decisions = fit_with_chunking(lambda chunks: trace_and_plan(chunks, found), lambda: found, options.hardware)
    return [with_chunking(plan, decisions, disabled=False) for plan in plans]


def options_for(model: torch.nn.Module, *, ddp: bool = False, fsdp: int | None = None, **settings: Any) -> Options:
    """``Options`` from ``graphopt.compile``'s names, counting the whole model's static
    memory; with `ddp`, one DDP rank's: DDP's gradient buckets too, as large as the
    trainable parameters (graphopt/distributed.py); with `fsdp` (N ranks), one rank's
    under per-block FSDP2 (``fsdp_rank_memory``)."""
    # Planning offline judges splits by graphopt's simulation: it plans for devices it
    # may not have, and composes deep models from per-node timelines (blocks.py).
    settings = {"prediction": "simulation", **settings}
    if fsdp is None:
        static = static_memory(model)
        held = RankMemory(static["parameters"], static["buffers"], gradient_buckets=static["gradients"] if ddp else 0)
        options = make_options(settings, model_static_bytes=held.total_bytes)
        return dataclasses.replace(options, rank_reserves=held.reserves())
    if ddp:
        raise GraphoptError("plan one DDP rank or one FSDP2 rank, not both")
    if not isinstance(fsdp, int) or isinstance(fsdp, bool) or fsdp < 1:
        raise GraphoptError(f"fsdp is the number of ranks FSDP2 shards over, a positive integer; got {fsdp!r}")
    for unsupported in ("trainable", "optimizer", "accumulation_steps"):
        if settings.get(unsupported) not in (None, "all", 1):
            raise GraphoptError(f"planning an FSDP2 rank with {unsupported}= is not supported yet (docs/distributed.md)")
    held = fsdp_rank_memory(model, fsdp)
    options = make_options(settings, model_static_bytes=held.total_bytes)
    check_disabled(options.disabled_passes, {"--fsdp": True})
    return dataclasses.replace(options, rank_reserves=held.reserves(), fsdp_ranks=fsdp)


def planned_fsdp_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks ``graphopt plan --fsdp`` shards as FSDP2 units, as torchtitan applies
    ``fully_shard`` to each transformer block: every block of every stack of identical
    blocks (``blocks.identical_blocks``). The rest of the model is the root unit."""
    return [block for _, stack in identical_blocks(model) for block in stack]


def _block_parameter_ids(model: torch.nn.Module) -> set[int]:
    """The parameters ``--fsdp`` shards (those of the block units), by id."""
    return {id(p) for unit in planned_fsdp_units(model) for p in unit.parameters()}


def fsdp_rank_memory(model: torch.nn.Module, ranks: int) -> RankMemory:
    """What one of `ranks` ranks holds for `model` under per-block FSDP2, for the plan of
    its traced step (``shard_parameters``), by kind.

    The traced graph's parameter inputs are the block parameters' shards and the root
    unit's parameters whole (FSDP2 does not reshard the root after its forward). Beside
    them the rank holds its shards of the root's parameters, and, at the largest block's
    size for the whole step, the all-gather reserve: a block's parameters whole while it
    runs (the graph frees each one after its last use, FSDP2 the block's together) and
    the next block's prefetched; the reduce-scatter reserve: a block's full gradients
    with the copy FSDP2 reduce-scatters from (the graph reduce-scatters each as it is
    made). Conservative: the graph's own windows come on top of the first reserve.
    """
    units = planned_fsdp_units(model)
    in_unit = _block_parameter_ids(model)
    parameters = {id(p): p for p in model.parameters()}  # tied weights once
    root = [p for key, p in parameters.items() if key not in in_unit]
    shard_bytes = sum(math.prod(shard_shape(p.shape, ranks)) * p.element_size() for p in parameters.values())
    unit_bytes = [sum(_tensor_bytes(p) for p in unit.parameters()) for unit in units]
    unit_gradients = [sum(_tensor_bytes(p) for p in unit.parameters() if p.requires_grad) for unit in units]
    return RankMemory(
        parameters=shard_bytes,
        buffers=static_memory(model)["buffers"],
        root_parameters=sum(_tensor_bytes(p) for p in root),
        gathered_reserve=(2 if len(units) > 1 else 1) * max(unit_bytes, default=0),
        reduce_scatter_reserve=2 * max(unit_gradients, default=0),
    )


class TracedStep:
    """A training step's joint graph, traced once. Each ``plan`` plans a fresh copy of it,
    so one trace serves any number of budgets with the plans ``plan_model`` would make."""

    def __init__(
        self,
        joint: fx.GraphModule,
        joint_inputs: Sequence[Any],
        num_fwd_outputs: int,
        static_indices: list[int],
        model: torch.nn.Module,
        traced_args: list[torch.Tensor],
        input_names: list[str | None],
    ):
        self._joint = joint
        self._joint_inputs = joint_inputs
        self._num_fwd_outputs = num_fwd_outputs
        self._static_indices = static_indices
        self._model = model
        self._traced_args = traced_args  # the step's arguments, AOTAutograd's primals in order
        self._input_names = input_names  # the parameter each traced argument is, or None
        self._min_cuts: dict = {}  # torch's min-cut of the graph, once for every budget (Session.min_cuts)

    # Plans come from this one trace of the model (``blocks.ComposedPlanner`` says
    # whether composing has given way to a whole trace).
    traced_whole = True

    def plan(self, options: Options) -> list[Plan]:
        """The plans for `options` (raises ``BudgetInfeasibleError`` when nothing fits)."""
        return self.plan_graphs(options)[0]

    def _sharding(self, ranks: int | None) -> GraphSharding | None:
        """Which of the step's inputs one FSDP2 rank holds as shards (``--fsdp``)."""
        if ranks is None:
            return None
        in_unit = _block_parameter_ids(self._model)
        names = dict(self._model.named_parameters())
        sharded = frozenset(
            i for i, name in enumerate(self._input_names) if name is not None and id(names[name]) in in_unit
        )
        return GraphSharding(ranks, sharded)

    def plan_graphs(
        self, options: Options, given: dict[str, str] | None = None
    ) -> tuple[list[Plan], fx.GraphModule, fx.GraphModule]:
        """The plans for `options` and the forward and backward graphs they split into;
        with `given` (decision key -> action), that plan is applied instead of solving.
        `given` comes from graphopt itself (composing a plan from fewer blocks): it may
        leave out tensors min-cut held through a view (``GivenPlan.complete``)."""
        with warnings.catch_warnings():  # copying the graph's pytree specs warns about torch's own API
            warnings.simplefilter("ignore", FutureWarning)
            joint = fx.GraphModule(self._joint, copy.deepcopy(self._joint.graph))  # the planner edits its graph
        given_plans = {GRAPH_NAME: GivenPlan(given, complete=False)} if given is not None else {}
        session = Session(options, given=given_plans, min_cuts=self._min_cuts)
        trainable = None
        if options.trainable is not None:
            selection = select_parameters(options.trainable, self._model)
            trainable = graph_trainable(selection, self._input_names, self._traced_args)
        forward, backward = partition(
            session,
            GRAPH_NAME,
            joint,
            self._joint_inputs,
            num_fwd_outputs=self._num_fwd_outputs,
            static_lifetime_input_indices=self._static_indices,
            trainable=trainable,
            sharding=self._sharding(options.fsdp_ranks),
        )
        return list(session.plans), forward, backward


def with_traced_step(
    model: torch.nn.Module,
    example_inputs: Sequence[Any] | Mapping[str, Any],
    use: Callable[[TracedStep], T],
    *,
    device: torch.device,
    loss_fn: LossFn | None = None,
    chunks: int = 1,
    loss_regions: list[LossRegion] | None = None,
) -> T:
    """Trace one training step of `model` on fake tensors, then return ``use(step)``.

    Meta tensors are traced as tensors of `device`; real ones keep theirs. `use` runs
    while the tracer's context is active, as a partitioner inside ``torch.compile`` does.
    The head + cross-entropy regions the trace finds are added to `loss_regions`, and
    computed in `chunks` chunks (passes/chunk_loss.py).
    """
    if not isinstance(model, torch.nn.Module):
        raise GraphoptError(f"the model must be a torch.nn.Module, got {type(model).__name__}")
    state = _named_state(model)
    inputs = _Inputs.of(example_inputs)
    # One traced argument per tensor object (Dynamo dedupes repeats the same way).
    unique: dict[int, torch.Tensor] = {}
    for tensor in list(state.values()) + list(inputs.tensors):
        unique.setdefault(id(tensor), tensor)
    slot = {key: i for i, key in enumerate(unique)}
    mode = torch_private.new_fake_mode()
    fake_args = [torch_private.to_fake(mode, tensor, device) for tensor in unique.values()]
    static_indices = sorted({slot[id(t)] for t in state.values()})  # parameters and buffers live all step
    input_names: list[str | None] = [None] * len(unique)
    for name, parameter in model.named_parameters():
        input_names[slot[id(parameter)]] = name
    results: list[T] = []

    def on_joint(joint: fx.GraphModule, joint_inputs: Sequence[Any], num_fwd_outputs: int) -> None:
        results.append(use(TracedStep(joint, joint_inputs, num_fwd_outputs, static_indices, model, fake_args, input_names)))

    step = _TrainingStep(
        model,
        {name: slot[id(t)] for name, t in state.items()},
        inputs,
        [slot[id(t)] for t in inputs.tensors],
        loss_fn,
    )
    step.chunks = chunks
    step.loss_regions = loss_regions if loss_regions is not None else []
    with _module_paths(model) as current_path:
        step.meta_fn = functools.partial(_node_meta, current_path)
        traced = torch_private.trace_joint(step, fake_args, on_joint)
    if not traced:
        raise GraphoptError(
            "the step's loss needs no gradient (no parameter requires grad, or the output is detached); "
            "graphopt plans training steps: make the parameters trainable"
        )
    return results[0]


def with_planner(
    model: torch.nn.Module,
    example_inputs: Sequence[Any] | Mapping[str, Any],
    use: Callable[[TracedStep | ComposedPlanner], T],
    *,
    device: torch.device,
    loss_fn: LossFn | None = None,
    compose: bool = True,
    chunks: int = 1,
    loss_regions: list[LossRegion] | None = None,
) -> T:
    """``use(planner)`` where ``planner.plan(options)`` plans one training step of `model`.

    A model with a stack of identical blocks (``blocks.find_repeated_blocks``) is traced
    with 3 and with 2 of them and its plans are composed (``blocks.ComposedPlanner``);
    otherwise, or with ``compose=False``, the whole step is traced (``with_traced_step``).
    """
    repeated = find_repeated_blocks(model) if compose else None
    tracing = dict(device=device, loss_fn=loss_fn, chunks=chunks, loss_regions=loss_regions)
    if repeated is None:
        return with_traced_step(model, example_inputs, use, **tracing)
    deep_model = with_blocks(model, repeated, TRACED_BLOCKS)
    shallow_model = with_blocks(model, repeated, TRACED_BLOCKS - 1)

    deep = with_traced_step(deep_model, example_inputs, _itself, **tracing)
    shallow = with_traced_step(shallow_model, example_inputs, _itself, **tracing)

    def trace_whole() -> TracedStep:
        return with_traced_step(model, example_inputs, _itself, **tracing)

    return use(ComposedPlanner(repeated, deep, shallow, trace_whole))


def _itself(step: TracedStep) -> TracedStep:
    return step


def planning_device(hardware: HardwareProfile | None) -> torch.device:
    """The device meta tensors are planned on: the profile's type when this process has one."""
    if hardware is not None and hardware.device_type == "cuda" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def static_memory(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of parameters, buffers and (one per trainable parameter) gradients.

    Each tensor counts once however many names it has; meta tensors count their size.
    """
    parameters = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    return {
        "parameters": sum(_tensor_bytes(p) for p in parameters.values()),
        "buffers": sum(_tensor_bytes(b) for b in buffers.values()),
        "gradients": sum(_tensor_bytes(p) for p in parameters.values() if p.requires_grad),
    }


def inputs_bytes(example_inputs: Sequence[Any] | Mapping[str, Any]) -> int:
    """Bytes of the tensors among the example inputs."""
    return sum(_tensor_bytes(t) for t in _Inputs.of(example_inputs).tensors)


def _tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _named_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters then buffers, by name, each tensor once (tied weights share one name)."""
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


@dataclasses.dataclass(frozen=True)
class _Inputs:
    """The example inputs split into tensors (traced) and everything else (constants)."""

    positional: tuple[Any, ...]
    keywords: dict[str, Any]
    tensors: tuple[torch.Tensor, ...]

    @classmethod
    def of(cls, example_inputs: Sequence[Any] | Mapping[str, Any]) -> _Inputs:
        if isinstance(example_inputs, torch.Tensor):
            example_inputs = (example_inputs,)
        if isinstance(example_inputs, Mapping):
            positional, keywords = (), dict(example_inputs)
        elif isinstance(example_inputs, Sequence) and not isinstance(example_inputs, str):
            positional, keywords = tuple(example_inputs), {}
        else:
            raise GraphoptError(
                f"example_inputs must be a tuple of the model's arguments or a dict of keyword arguments, "
                f"got {type(example_inputs).__name__}"
            )
        values = list(positional) + list(keywords.values())
        return cls(positional, keywords, tuple(v for v in values if isinstance(v, torch.Tensor)))

    def rebuild(self, tensors: Sequence[torch.Tensor]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The arguments with each tensor replaced, in order, by one of `tensors`."""
        replacements = iter(tensors)

        def swap(value: Any) -> Any:
            return next(replacements) if isinstance(value, torch.Tensor) else value

        positional = tuple(swap(v) for v in self.positional)
        return positional, {k: swap(v) for k, v in self.keywords.items()}


class _TrainingStep(torch.nn.Module):
    """The loss of one step as a function of (parameters, buffers, inputs), all explicit.

    The model is held outside the module tree so AOTAutograd sees no parameters of ours:
    they arrive as arguments (fake tensors) and reach the model through functional_call.
    A tensor passed several times (an input given twice) is one argument.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        state_slots: dict[str, int],
        inputs: _Inputs,
        input_slots: list[int],
        loss_fn: LossFn | None,
    ):
        super().__init__()
        self.__dict__["_model"] = model
        self._state_slots = state_slots  # name -> index among the traced arguments
        self._inputs = inputs
        self._input_slots = input_slots
        self._loss_fn = loss_fn
        self.meta_fn: Callable[[], dict[str, Any]] = dict
        self.chunks = 1  # the head + cross-entropy in this many chunks (passes/chunk_loss.py)
        self.loss_regions: list[LossRegion] = []  # the head + cross-entropy regions the trace found

    def forward(self, *flat: torch.Tensor) -> tuple[torch.Tensor]:
        state = {name: flat[i] for name, i in self._state_slots.items()}
        args, kwargs = self._inputs.rebuild([flat[i] for i in self._input_slots])
        chunking = ChunkLossMode(self.chunks, {id(tensor): name for name, tensor in state.items()})
        with torch_private.UserCodeMode(self.meta_fn, _refuse_stray_meta), chunking:
            output = torch.func.functional_call(self._model, state, args, kwargs)
            loss = self._loss_fn(output) if self._loss_fn is not None else loss_of(output)
        self.loss_regions.extend(region for region in chunking.regions if region not in self.loss_regions)
        return (loss,)


def _refuse_stray_meta(tensor: torch.Tensor) -> None:
    raise GraphoptError(
        f"the model uses a meta tensor of shape {tuple(tensor.shape)} that is neither a parameter, a buffer nor "
        "an input (a plain attribute?); register it with register_buffer(name, tensor, persistent=False) "
        "so graphopt can trace it on fake tensors"
    )


def loss_of(output: Any) -> torch.Tensor:
    """The tensor a training step backpropagates from the model's output."""
    if isinstance(output, torch.Tensor):
        return output
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, Mapping):
        loss = output.get("loss")
    if loss is None and isinstance(output, (tuple, list)) and output:
        loss = output[0]
    if not isinstance(loss, torch.Tensor):
        raise GraphoptError(
            f"cannot find the loss in the model's output ({type(output).__name__}); return a tensor, "
            "an object with a .loss, or a tuple whose first element is the loss, or pass loss_fn"
        )
    return loss


@contextlib.contextmanager
def _module_paths(model: torch.nn.Module) -> Iterator[list[tuple[str, str]]]:
    """A live list of (module path, class name) for the submodules running now, outermost first."""
    stack: list[tuple[str, str]] = []
    handles = []
    for path, module in model.named_modules():
        if not path:
            continue
        entry = (path, f"{type(module).__module__}.{type(module).__qualname__}")
        handles.append(module.register_forward_pre_hook(functools.partial(_push, stack, entry)))
        handles.append(module.register_forward_hook(functools.partial(_pop, stack), always_call=True))
    try:
        yield stack
    finally:
        for handle in handles:
            handle.remove()


def _push(stack: list, entry: tuple[str, str], _module: Any, _args: Any) -> None:
    stack.append(entry)


def _pop(stack: list, _module: Any, _args: Any, _output: Any) -> None:
    stack.pop()


def _node_meta(module_path: list[tuple[str, str]]) -> dict[str, Any]:
    """The fields Dynamo would leave on a node: its module stack and the user's source."""
    meta: dict[str, Any] = {}
    if module_path:
        meta["nn_module_stack"] = {path: (path, kind) for path, kind in module_path}
    trace = _user_stack_trace()
    if trace:
        meta["stack_trace"] = trace
    return meta


def _user_stack_trace() -> str:
    """The Python stack inside the model's call in traceback format, outermost first,
    keeping only the user's frames (neither torch's, graphopt's nor the standard library's)."""
    frames = []
    frame = sys._getframe(1)
    while frame is not None and frame.f_code is not _TrainingStep.forward.__code__:
        filename = frame.f_code.co_filename
        if _is_user_file(filename):
            frames.append((filename, frame.f_lineno, frame.f_code.co_name))
        frame = frame.f_back
    frames.reverse()
    return "".join(traceback.format_list([traceback.FrameSummary(f, n, name) for f, n, name in frames]))


def _is_user_file(filename: str) -> bool:
    if filename.startswith((_TORCH_DIR, _GRAPHOPT_DIR)):
        return False
    return not filename.startswith(_STDLIB_DIR) or any(name in filename for name in _PACKAGE_DIR_NAMES)
