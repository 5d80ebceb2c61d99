"""Which parameters a fine-tuning step trains: the ``trainable=`` option.

Accepted spellings (parameter names are those of ``model.named_parameters()``):

- ``"all"`` (default): every parameter that requires a gradient trains.
- ``"bias"``: parameters whose last name component is ``bias``.
- a glob pattern (``"blocks.3.*"``) or a list of them, matched with ``fnmatch``.
- a dict of pattern -> fraction of output channels (dim 0) that train, in (0, 1]:
  ``{"blocks.*.mlp.up.weight": 0.25, "*.bias": 1.0}``. The first ``ceil(fraction *
  rows)`` rows train. The reserved key ``"last_blocks": k`` selects every parameter of
  the last k blocks of the model's largest numbered container (an ``nn.ModuleList`` or
  ``nn.Sequential``: the name prefix with numbered children holding the most parameters).

Everything not selected is frozen: it gets no gradient (``.grad`` stays ``None``), so
an optimizer skips it. Parameters with ``requires_grad=False`` stay frozen whatever the
selection says. The model itself is not touched; graphopt prunes the training graph
(``graphopt/passes/prune_frozen.py``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.hooks import RemovableHandle

from .errors import GraphoptError

LAST_BLOCKS = "last_blocks"


@dataclasses.dataclass(frozen=True)
class TrainableSpec:
    """The user's ``trainable=`` value, checked and normalised (hashable, for cache keys).

    ``patterns`` pairs each glob with the fraction of output channels it trains;
    ``last_blocks`` is 0 when not asked for. ``None`` in ``Options`` means ``"all"``.
    """

    patterns: tuple[tuple[str, float], ...]
    last_blocks: int = 0
    bias: bool = False
    text: str = ""  # the user's spelling, for messages

    def select(self, names: Sequence[str]) -> tuple[dict[str, float], list[str]]:
        """The fraction each selected name trains, and the patterns that matched nothing
        (``"bias"`` standing for the bias selector)."""
        selected: dict[str, float] = {}
        unmatched = []
        for pattern, fraction in self.patterns:
            matched = fnmatch.filter(names, pattern)
            if not matched:
                unmatched.append(pattern)
            for name in matched:
                if selected.get(name, fraction) != fraction:
                    raise GraphoptError(
                        f"trainable={self.text}: parameter {name!r} matches patterns with different fractions "
                        f"({selected[name]} and {fraction}); make the patterns disjoint"
                    )
                selected[name] = fraction
        if self.bias:
            bias = [name for name in names if name.rsplit(".", 1)[-1] == "bias"]
            if not bias:
                unmatched.append("bias")
            selected.update({name: selected.get(name, 1.0) for name in bias})
        if self.last_blocks:
            blocks = last_blocks(names, self.last_blocks, self.text)
            selected.update({name: selected.get(name, 1.0) for name in blocks})
        return selected, unmatched


def parse_trainable(value: Any) -> TrainableSpec | None:
    """Check a ``trainable=`` value; ``None`` means every parameter trains."""
    text = repr(value)
    if value is None or (isinstance(value, str) and value == "all"):
        return None
    if isinstance(value, str):
        if value == "bias":
            return TrainableSpec(patterns=(), bias=True, text=text)
        return TrainableSpec(patterns=((value, 1.0),), text=text)
    if isinstance(value, Mapping):
        return _parse_mapping(value, text)
    if isinstance(value, Iterable) and not isinstance(value, (bytes, torch.Tensor)):
        patterns = list(value)
        if patterns and all(isinstance(p, str) for p in patterns):
            return TrainableSpec(patterns=tuple((p, 1.0) for p in patterns), text=text)
    raise GraphoptError(
        f"trainable={text} is not understood; use 'all', 'bias', a glob pattern of parameter names, a list "
        "of them, or a dict {pattern: fraction of output channels in (0, 1], 'last_blocks': k}"
    )


def _parse_mapping(value: Mapping, text: str) -> TrainableSpec:
    patterns, blocks = [], 0
    for key, setting in value.items():
        if key == LAST_BLOCKS:
            if isinstance(setting, bool) or not isinstance(setting, int) or setting < 1:
                raise GraphoptError(f"trainable={text}: 'last_blocks' must be a positive int, got {setting!r}")
            blocks = setting
            continue
        if not isinstance(key, str):
            raise GraphoptError(f"trainable={text}: keys must be glob patterns of parameter names, got {key!r}")
        if isinstance(setting, bool) or not isinstance(setting, (int, float)) or not 0 < setting <= 1:
            raise GraphoptError(
                f"trainable={text}: the fraction for {key!r} must be a number in (0, 1] (the share of "
                f"output channels that train), got {setting!r}"
            )
        patterns.append((key, float(setting)))
    return TrainableSpec(patterns=tuple(patterns), last_blocks=blocks, text=text)


def last_blocks(names: Sequence[str], count: int, text: str = "") -> list[str]:
    """Names under the last `count` children of the numbered container with the most parameters."""
    members: dict[str, dict[int, list[str]]] = {}
    for name in names:
        prefix = ""
        for part_index, part in enumerate(name.split(".")[:-1]):
            if part.isdigit():
                members.setdefault(prefix, {}).setdefault(int(part), []).append(name)
            prefix = f"{prefix}.{part}" if part_index else part
    containers = {prefix: children for prefix, children in members.items() if len(children) >= 2}
    if not containers:
        raise GraphoptError(
            f"trainable={text}: 'last_blocks' needs a container of numbered blocks (nn.ModuleList or "
            "nn.Sequential), and no parameter name has one; name the blocks with glob patterns instead"
        )
    prefix, children = max(containers.items(), key=lambda item: sum(len(v) for v in item[1].values()))
    if count > len(children):
        raise GraphoptError(
            f"trainable={text}: asks for the last {count} blocks, but {prefix or 'the model'!r} has {len(children)}"
        )
    return [name for index in sorted(children)[-count:] for name in children[index]]


def select_parameters(spec: TrainableSpec, model: torch.nn.Module) -> dict[str, float]:
    """Resolve `spec` against a whole model, with every check: each selector must match a
    parameter, and no selector may name a buffer."""
    names = [name for name, _ in model.named_parameters()]
    selected, unmatched = spec.select(names)
    if unmatched:
        buffers = [name for name, _ in model.named_buffers()]
        hints = []
        for pattern in unmatched:
            named_buffers = fnmatch.filter(buffers, pattern)
            if named_buffers:
                hints.append(f"{pattern!r} names buffers ({', '.join(named_buffers[:3])}), not parameters")
        sample = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
        raise GraphoptError(
            f"trainable={spec.text}: {', '.join(map(repr, unmatched))} matched no parameter of the model"
            + (f" ({'; '.join(hints)})" if hints else "")
            + f". Parameter names look like: {sample}"
        )
    shapes = dict((name, tuple(p.shape)) for name, p in model.named_parameters())
    for name, fraction in selected.items():
        if fraction < 1 and len(shapes[name]) == 0:
            raise GraphoptError(f"trainable={spec.text}: {name!r} is a scalar; it has no channels to train a fraction of")
    return selected


def trainable_rows(fraction: float, shape: Sequence[int]) -> int:
    """Rows (output channels, dim 0) a fraction trains: at least one."""
    if not shape:
        return 0
    return max(1, math.ceil(fraction * shape[0]))


# ----------------------------------------------------------------------------- optimizers


class FrozenRowsGuard:
    """Refuses optimizer steps that would change the frozen rows of one compiled model's
    partly trained parameters.

    Their gradients are zero in the frozen rows, which leaves a row unchanged under
    torch's optimizers (SGD with momentum, Adam, AdamW, RMSprop, Adagrad, ...) from a
    fresh state, except for weight decay, which shrinks every row whatever the gradient.
    A parameter group holding such a parameter must have ``weight_decay=0``; the hook
    this guard installs with torch's public ``register_optimizer_step_pre_hook`` raises
    before a step that breaks that. The hook sees every optimizer in the process, so it
    looks only at the parameters added here (held weakly), holds the guard weakly, and is
    removed when the guard is freed with the compiled model that owns it.
    """

    def __init__(self) -> None:
        self._parameters: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
        self._hook: RemovableHandle | None = None

    def add(self, parameters: Iterable[torch.Tensor]) -> None:
        """Guard these parameters too; the hook goes in with the first of them."""
        for parameter in parameters:
            self._parameters[id(parameter)] = parameter
        if self._parameters and self._hook is None:
            self._hook = register_optimizer_step_pre_hook(_hook_for(weakref.ref(self)))
            weakref.finalize(self, self._hook.remove)

    def check(self, optimizer: torch.optim.Optimizer) -> None:
        """Raise if `optimizer` would decay a guarded parameter."""
        for group in optimizer.param_groups:
            if not group.get("weight_decay"):
                continue
            for parameter in group["params"]:
                if self._parameters.get(id(parameter)) is parameter:
                    raise GraphoptError(
                        f"{type(optimizer).__name__} has weight_decay={group['weight_decay']} for a parameter of "
                        f"shape {tuple(parameter.shape)} that graphopt trains only partly (trainable= with a "
                        "fraction): weight decay would change its frozen channels. Put such parameters in a "
                        "parameter group with weight_decay=0."
                    )


def _hook_for(guard: weakref.ref[FrozenRowsGuard]) -> Callable[[torch.optim.Optimizer, tuple, dict], None]:
    """An optimizer pre-step hook that checks through `guard` while it lives."""

    def check(optimizer: torch.optim.Optimizer, _args: tuple, _kwargs: dict) -> None:
        alive = guard()
        if alive is not None:
            alive.check(optimizer)

    return check


# ----------------------------------------------------------------------------- one graph


@dataclasses.dataclass(frozen=True)
class GraphTrainable:
    """What each input of one captured graph trains, for the inputs that do not train fully.

    ``rows[i]`` is how many leading rows of input ``i`` train (0: frozen); ``names[i]``
    its parameter name; ``input_shapes`` every input's shape (None for non-tensors), to
    check that the joint graph's primals are these inputs, in this order.
    """

    rows: dict[int, int]
    names: dict[int, str]
    input_shapes: tuple[tuple[int, ...] | None, ...]


def graph_trainable(
    selection: Mapping[str, float], input_names: Sequence[str | None], example_inputs: Sequence[Any]
) -> GraphTrainable:
    """`selection` (name -> fraction that trains) applied to one graph's parameter inputs."""
    rows, names = {}, {}
    for index, (name, value) in enumerate(zip(input_names, example_inputs)):
        if name is None:
            continue
        fraction = selection.get(name, 0.0)
        if fraction == 0:
            rows[index], names[index] = 0, name
        elif value.dim() > 0 and trainable_rows(fraction, value.shape) < value.shape[0]:
            rows[index], names[index] = trainable_rows(fraction, value.shape), name
    shapes = tuple(tuple(v.shape) if isinstance(v, torch.Tensor) else None for v in example_inputs)
    return GraphTrainable(rows, names, shapes)
