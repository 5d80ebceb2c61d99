"""What a call's forwards change outside their graphs, kept so a rerun call starts alike.

``graphopt.compile`` reruns a call when a later graph asks for the earlier ones to be
planned again (``ReplanEarlierGraphs``) or a size outgrew a plan: the earlier graphs'
forwards have run by then. Without care the rerun updates a BatchNorm's running
statistics and ``num_batches_tracked`` twice and draws twice from the RNG (dropout
masks differ from a step that ran once). ``ForwardWrites`` keeps the values of the
inputs the step's graphs write in place (found as each graph is compiled:
``torch_private.written_input_positions``) and the RNG state as a call starts, and puts them
back before the call runs again, so the rerun call's forwards change them once. What
Python code between the graphs does (a counter, a print) is not undone.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch


class ForwardWrites:
    """The tensors some graph's forward writes, and their values as the current call started."""

    def __init__(self) -> None:
        self._written: dict[int, weakref.ref[torch.Tensor]] = {}  # by id(tensor)
        self._before: dict[int, torch.Tensor] | None = None  # while a call runs
        self._rng: tuple[torch.Tensor, list[torch.Tensor]] | None = None

    def call_starts(self) -> None:
        """Keep what the call may change: the written tensors known so far, the RNG state."""
        self._before = {}
        for key, ref in list(self._written.items()):
            tensor = ref()
            if tensor is None:
                del self._written[key]
            else:
                self._before[key] = tensor.detach().clone()
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
        self._rng = (torch.get_rng_state(), cuda)

    def graph_writes(self, tensors: Iterable[torch.Tensor]) -> None:
        """A graph compiled during the call writes `tensors` in place; it has not run yet,
        so their values now are the call's starting ones."""
        for tensor in tensors:
            key = id(tensor)
            known = self._written.get(key)
            if known is None or known() is not tensor:  # new, or a new tensor where a freed one was
                self._written[key] = weakref.ref(tensor)
            if self._before is not None and key not in self._before:
                self._before[key] = tensor.detach().clone()

    def undo(self) -> None:
        """Put back what the call's forwards changed, before the call runs again."""
        with torch.no_grad():
            for key, value in (self._before or {}).items():
                tensor = self._written[key]() if key in self._written else None
                if tensor is not None:
                    tensor.copy_(value)
        if self._rng is not None:
            cpu, cuda = self._rng
            torch.set_rng_state(cpu)
            if cuda:
                torch.cuda.set_rng_state_all(cuda)

    def call_ends(self) -> None:
        self._before, self._rng = None, None
