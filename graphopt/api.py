"""What users call: ``graphopt.compile`` and ``graphopt.plans``."""

from __future__ import annotations

from typing import Any

import torch

from .backend import GraphoptBackend
from .config import make_options
from .errors import GraphoptError
from .plan import Plan

_SESSION_ATTRIBUTE = "_graphopt_backend"


def compile(  # noqa: A001 - mirrors torch.compile
    model: torch.nn.Module | Any,
    *,
    memory_budget: int | float | str | None = None,
    hardware: Any = "auto",
    solver_time_limit_s: float = 30.0,
    fullgraph: bool = False,
    dynamic: bool | None = None,
    compiler: str = "inductor",
    cost_model: str = "roofline",
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
    ``cost_model="measured"`` prices recomputation by timing each op on this machine
    (cached in ~/.cache/graphopt) instead of the hardware profile's roofline.
    """
    options = make_options(
        memory_budget=memory_budget,
        hardware=hardware,
        solver_time_limit_s=solver_time_limit_s,
        compiler=compiler,
        cost_model=cost_model,
        verbose=verbose,
        model_static_bytes=_static_bytes(model),
    )
    backend = GraphoptBackend(options)
    compiled = torch.compile(model, backend=backend, fullgraph=fullgraph, dynamic=dynamic)
    object.__setattr__(compiled, _SESSION_ATTRIBUTE, backend)
    return compiled


def plans(compiled: Any) -> list[Plan]:
    """The plans graphopt made for a compiled model, one per captured graph (after a first call)."""
    backend = getattr(compiled, _SESSION_ATTRIBUTE, None)
    if backend is None:
        raise GraphoptError("this object was not made by graphopt.compile; compile the model with graphopt.compile(...)")
    return list(backend.session.plans)


def _static_bytes(model: Any) -> int:
    """Bytes of the model's parameters and buffers, each storage counted once."""
    if not isinstance(model, torch.nn.Module):
        return 0
    storages = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())
