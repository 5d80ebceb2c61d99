"""Optimizer in backward: the ``graphopt::apply_update`` op and the registry it runs.

With ``graphopt.compile(model, optimizer=opt)`` the user's loop is ``loss = cm(x);
loss.backward()``: no ``opt.step()``, no ``zero_grad()``. AOTAutograd's compiled backward
returns every gradient at its very end, so a post-accumulate-grad hook would free nothing
early; the gradients have to be consumed *inside* the backward graph. Two passes put them
there: ``insert_updates`` (passes/insert_updates.py) adds, for each gradient of a
parameter the optimizer manages, ``graphopt::apply_update(param, grad, slot)`` to the
joint graph and returns ``None`` in that gradient's place; ``place_updates``
(passes/place_updates.py) moves each update in a split backward right after the last read
of that parameter (or of a view of it) and after the gradient is complete. The op's
schema says it writes ``param``, so it is never dead code and Inductor keeps every
earlier read of the parameter before it; its outputs are none, so the gradient's buffer
is freed right after.

At run time the op looks ``slot`` up in a registry (parameter, optimizer) and runs the
user's optimizer on that one parameter: ``opt.param_groups`` is swapped for one group
holding only the parameter, with the hyperparameters the user's group has *now* (so LR
schedulers keep working), ``param.grad`` is set, ``opt.step()`` runs, and ``param.grad``
goes back to ``None``. ``opt.state`` stays the user's, so ``state_dict`` works. This is
exact for optimizers whose update of a parameter depends only on that parameter's
gradient and state: every ``torch.optim`` optimizer but ``LBFGS`` (a closure over the
whole model) and ``SparseAdam`` (sparse gradients).

With ``accumulation_steps=k`` the op adds the gradient into ``param.grad`` on the first
k-1 backwards, as autograd would (a copy on the first: the compiled backward may reuse
the gradient's buffer), and on every k-th runs the step from ``param.grad`` plus the
last gradient, then sets ``param.grad`` back to ``None``: one update per k micro-batches,
from the same sum eager accumulation makes.

Restrictions: one forward and one backward per micro-batch (no global-norm gradient
clipping: gradients never exist all at once); a
parameter's whole gradient must come from one compiled graph (a parameter used on both
sides of a graph break raises when the second graph compiles; the same graph run twice
before one backward fails autograd's saved-tensor version check, since the first
backward's updates write parameters the second one saved).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import random
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx

from .. import torch_private
from ..cost_models.memory import value_bytes
from ..errors import GraphoptError

# Optimizers whose step cannot run one parameter at a time.
_WHOLE_MODEL_OPTIMIZERS = {
    "LBFGS": "its step re-evaluates the whole model through a closure",
    "SparseAdam": "it needs sparse gradients, and compiled gradients are dense",
}
# Slots start at a random offset per process: a slot number is baked into the compiled
# backward's code, so a graph cached by another process never names one of ours.
_SLOTS = itertools.count(random.SystemRandom().randrange(1 << 40))
_UPDATES: dict[int, _ParameterUpdate] = {}


@torch.library.custom_op("graphopt::apply_update", mutates_args=("parameter",))
def apply_update(parameter: torch.Tensor, gradient: torch.Tensor, slot: int, after: list[torch.Tensor]) -> None:
    """Run the registered optimizer's step on the parameter of `slot` with `gradient`.

    `after` are the outputs of the backward's other reads of the parameter: unused
    here, they make those reads data dependencies of the update. The schema's write
    alone is not enough: Inductor may fuse a pointwise read of the parameter into a
    consumer kernel that runs after the write (measured on the bench GPT: LayerNorm's
    input gradient read its weight after the weight's update).
    """
    update = _UPDATES.get(slot)
    if update is None:
        raise GraphoptError(f"graphopt::apply_update: no parameter is registered under slot {slot}; recompile the model")
    update.run(parameter, gradient)


@apply_update.register_fake
def _apply_update_fake(parameter: torch.Tensor, gradient: torch.Tensor, slot: int, after: list[torch.Tensor]) -> None:
    return None


APPLY_UPDATE = torch.ops.graphopt.apply_update.default


def check_optimizer(optimizer: Any) -> None:
    """Raise unless `optimizer` can run inside the backward, one parameter at a time."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise GraphoptError(f"optimizer= takes a torch.optim.Optimizer, got {type(optimizer).__name__}")
    reason = _WHOLE_MODEL_OPTIMIZERS.get(type(optimizer).__name__)
    if reason is not None:
        raise GraphoptError(
            f"optimizer={type(optimizer).__name__} cannot run inside the backward: {reason}. "
            "Leave optimizer= out and call opt.step() after loss.backward()."
        )
    if any(_is_sharded(p) for group in optimizer.param_groups for p in group["params"]):
        raise GraphoptError(
            "optimizer= holds sharded parameters (DTensors: FSDP2's fully_shard or tensor parallelism). "
            "An update inside the backward would see the unsharded gradient before FSDP2 reduce-scatters it "
            "across ranks, and the unsharded parameter FSDP2 frees after the backward, not the rank's shard. "
            "Leave optimizer= out and call opt.step() after loss.backward()."
        )


def refuse_under_ddp(optimizer: Any) -> None:
    """Raise when `optimizer` would run inside the backward of a DDP model: the update
    would read this rank's gradient before DDP all-reduces it across ranks."""
    if optimizer is not None:
        raise GraphoptError(
            "optimizer= cannot run inside the backward of a DistributedDataParallel model: each update would "
            "read this rank's own gradient before DDP all-reduces the gradients across ranks, so the ranks' "
            "parameters would drift apart. Leave optimizer= out and call opt.step() after loss.backward()."
        )


def _is_sharded(parameter: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(parameter, DTensor)


class _ParameterUpdate:
    """One parameter's step, run by ``graphopt::apply_update``. Holds weak references:
    the registry must not keep a model or its optimizer alive."""

    def __init__(self, parameter: torch.nn.Parameter, optimizer: torch.optim.Optimizer, name: str, accumulation_steps: int = 1):
        self._parameter = weakref.ref(parameter)
        self._optimizer = weakref.ref(optimizer)
        self.name = name
        self._group: dict | None = None  # the optimizer's group holding the parameter, when last seen
        self._accumulation_steps = accumulation_steps
        self._backwards = 0  # gradients received; the update runs on every accumulation_steps-th

    @property
    def parameter(self) -> torch.Tensor | None:
        return self._parameter()

    def run(self, graph_parameter: torch.Tensor, gradient: torch.Tensor) -> None:
        parameter, optimizer = self._parameter(), self._optimizer()
        if parameter is None or optimizer is None:
            raise GraphoptError(f"parameter {self.name} or its optimizer was freed; recompile the model")
        if graph_parameter.data_ptr() != parameter.data_ptr():
            raise GraphoptError(f"the compiled backward passed another tensor for parameter {self.name}; recompile the model")
        micro_batch = self._backwards % self._accumulation_steps
        if micro_batch == 0 and parameter.grad is not None:
            raise GraphoptError(
                f"parameter {self.name} already has a .grad while graphopt applies its update in the backward: "
                "with optimizer= its gradient must come only from the compiled model, and the update consumes it; "
                "set it to None first. For gradient accumulation over k micro-batches, pass accumulation_steps=k."
            )
        self._backwards += 1
        if micro_batch > 0:  # autograd's sum, in its order: ((g1 + g2) + g3)
            if parameter.grad is None:
                raise GraphoptError(
                    f"parameter {self.name}'s .grad was cleared after {micro_batch} of {self._accumulation_steps} "
                    "micro-batches: with optimizer= and accumulation_steps=, graphopt holds the accumulated gradient "
                    "there until its update; do not call zero_grad() in between."
                )
            gradient = parameter.grad.add_(gradient)
        if micro_batch < self._accumulation_steps - 1:
            if parameter.grad is None:  # a copy: the compiled backward may reuse the gradient's buffer
                parameter.grad = gradient.detach().clone()
            return
        groups = optimizer.param_groups
        one_parameter_group = {**self._find_group(groups, parameter), "params": [parameter]}
        parameter.grad = gradient
        optimizer.param_groups = [one_parameter_group]
        try:
            optimizer.step()
        finally:
            optimizer.param_groups = groups
            parameter.grad = None

    def _find_group(self, groups: list[dict], parameter: torch.Tensor) -> dict:
        """The group holding the parameter; cached, and found again after load_state_dict
        or add_param_group replace the groups."""
        if self._group is not None and any(group is self._group for group in groups):
            return self._group
        for group in groups:
            if any(p is parameter for p in group["params"]):
                self._group = group
                return group
        raise GraphoptError(f"parameter {self.name} is no longer in the optimizer's param_groups; recompile the model")


@dataclasses.dataclass(frozen=True)
class GraphParameters:
    """Which inputs of one captured graph are parameters the optimizer manages."""

    num_inputs: int
    slots: dict[int, int]  # input position -> update slot


class OptimizerInBackward:
    """The ``optimizer=`` of one ``graphopt.compile``: slots for its parameters, the
    optimizer state's bytes, and which Dynamo frame each parameter was captured in."""

    def __init__(self, optimizer: torch.optim.Optimizer, accumulation_steps: int = 1):
        check_optimizer(optimizer)
        self.optimizer = optimizer
        self.accumulation_steps = accumulation_steps
        self._slots: dict[int, int] = {}  # id(parameter) -> slot
        self._frames: dict[int, object] = {}  # slot -> Dynamo frame that captured it
        self._managed = {id(p): p for group in optimizer.param_groups for p in group["params"]}
        # Measured now, outside any tracing: the probe's step must run on real tensors.
        self.state_bytes = sum(_state_bytes(optimizer, group) for group in optimizer.param_groups)

    def graph_parameters(self, graph_module: fx.GraphModule, example_inputs: Sequence[Any]) -> GraphParameters:
        """Slots for the managed parameters among a captured graph's inputs.

        AOTAutograd's primals are the graph's own parameters and buffers, then its inputs;
        Dynamo lifts a module's parameters to inputs (``inline_inbuilt_nn_modules``), so a
        graph that owns tensors itself cannot be mapped and is refused.
        """
        owned = [name for name, _ in itertools.chain(graph_module.named_parameters(), graph_module.named_buffers())]
        if owned:
            raise GraphoptError(
                f"optimizer= needs the model's parameters as graph inputs, but the captured graph owns {owned[:3]}; "
                "keep Dynamo's inline_inbuilt_nn_modules setting True (the default)."
            )
        frame = torch_private.current_frame_id()
        names = torch_private.parameter_input_names(graph_module, example_inputs)
        slots = {}
        for position, (tensor, name) in enumerate(zip(example_inputs, names)):
            if isinstance(tensor, torch.Tensor) and tensor.requires_grad and self._managed.get(id(tensor)) is tensor:
                slot = self._slot(tensor, f"parameter {name or position} {tuple(tensor.shape)}")
                self._check_one_frame(slot, frame)
                slots[position] = slot
        return GraphParameters(len(example_inputs), slots)

    def _slot(self, parameter: torch.Tensor, name: str) -> int:
        if id(parameter) not in self._slots:
            slot = next(_SLOTS)
            _UPDATES[slot] = _ParameterUpdate(parameter, self.optimizer, name, self.accumulation_steps)
            weakref.finalize(parameter, _UPDATES.pop, slot, None)
            self._slots[id(parameter)] = slot
        return self._slots[id(parameter)]

    def _check_one_frame(self, slot: int, frame: object) -> None:
        """A recompilation of the same frame replaces a graph; a graph break adds one, and
        then a parameter in both would be updated with half its gradient."""
        first = self._frames.setdefault(slot, frame)
        if first != frame:
            raise GraphoptError(
                f"{_UPDATES[slot].name} is used on both sides of a graph break; optimizer= needs each parameter's "
                "whole gradient in one graph. Remove the graph break (compile with fullgraph=True to find it)."
            )

    def updates_for(self, joint: torch_private.JointGraph, graph: GraphParameters | None) -> GraphUpdates:
        """The primals of `joint` to update in its backward, checked against the graph's inputs."""
        if graph is None or not graph.slots:
            return GraphUpdates({}, self.state_bytes)
        if len(joint.primals) != graph.num_inputs:
            raise GraphoptError(
                f"cannot map the joint graph's {len(joint.primals)} primals to the captured graph's "
                f"{graph.num_inputs} inputs, so optimizer= cannot tell which are parameters"
            )
        slots = {}
        for position, slot in graph.slots.items():
            primal, parameter = joint.primals[position], _UPDATES[slot].parameter
            value = primal.meta.get("val")
            if not isinstance(value, torch.Tensor) or (value.shape, value.dtype) != (parameter.shape, parameter.dtype):
                raise GraphoptError(f"joint graph input {primal.name} does not match {_UPDATES[slot].name}")
            slots[primal.name] = slot
        return GraphUpdates(slots, self.state_bytes)


@dataclasses.dataclass(frozen=True)
class GraphUpdates:
    """The updates of one graph's backward."""

    slots: Mapping[str, int]  # joint-graph primal name -> slot
    optimizer_state_bytes: int


def _state_bytes(optimizer: torch.optim.Optimizer, group: dict) -> int:
    """Bytes of a group's optimizer state after a step.

    Parameters that have state already (a step ran, or ``load_state_dict``) are counted
    as they are. For the others, a copy of the optimizer steps a small probe of the
    parameter's dtype and number of dimensions with the group's hyperparameters; a state
    tensor of the probe's size scales with the parameter (exact for element-wise
    optimizers), any other is counted at its own size (a step counter; for factored
    optimizers such as Adafactor, row and column statistics: an underestimate).
    """
    total, per_element, constant = 0, {}, {}
    for parameter in group["params"]:
        state = optimizer.state.get(parameter)
        if state:
            total += sum(value_bytes(value) for value in state.values())
            continue
        key = (parameter.dtype, parameter.device, parameter.dim())
        if key not in per_element:
            per_element[key], constant[key] = _probe_state(optimizer, group, *key)
        total += per_element[key] * parameter.numel() + constant[key]
    return total


def _probe_state(
    optimizer: torch.optim.Optimizer, group: dict, dtype: torch.dtype, device: torch.device, dimensions: int
) -> tuple[int, int]:
    """(bytes per parameter element, constant bytes) of one parameter's state."""
    probe = torch.zeros((2, 3, 5, 7)[:dimensions], dtype=dtype, device=device, requires_grad=True)
    probe.grad = torch.ones_like(probe)
    # Unpickling's path: a fresh optimizer of the same class with the same settings, and
    # none of the original's hooks (an LR scheduler's step counter among them).
    copy = type(optimizer).__new__(type(optimizer))
    copy.__setstate__(
        {"defaults": dict(optimizer.defaults), "state": collections.defaultdict(dict), "param_groups": [{**group, "params": [probe]}]}
    )
    copy.step()
    per_element = constant = 0
    for value in copy.state[probe].values():
        if isinstance(value, torch.Tensor) and value.numel() == probe.numel():
            per_element += value.element_size()
        else:
            constant += value_bytes(value)
    return per_element, constant
