"""The ``graphopt`` dynamo backend: each captured graph is compiled with graphopt's partitioner."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch.fx as fx

from . import __version__, torch_private
from .config import Options, make_options
from .planner import Session, partition

# torch.compile(backend="graphopt", options=d) calls the backend once per graph with the
# same dict `d`; graphs of one compiled model share a Session (and so one budget) by it.
_SESSIONS_BY_OPTIONS: dict[int, tuple[dict, Session]] = {}


class GraphoptBackend:
    """A dynamo backend bound to one Session (what ``graphopt.compile`` installs)."""

    def __init__(self, options: Options):
        self.session = Session(options)
        self._graphs = 0

    def __call__(self, graph_module: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        graph_name = f"graph_{self._graphs}"
        self._graphs += 1
        partition_fn = functools.partial(partition, self.session, graph_name)
        if self.session.options.compiler == "eager":
            return torch_private.compile_without_codegen(graph_module, example_inputs, partition_fn)
        uuid = f"graphopt-{__version__}-{self.session.options.cache_key()}-{graph_name}"
        return torch_private.compile_with_inductor(graph_module, example_inputs, partition_fn, uuid)


def graphopt_backend(graph_module: fx.GraphModule, example_inputs: Sequence[Any], options: dict | None = None) -> Callable:
    """Entry point for ``torch.compile(model, backend="graphopt", options={...})``."""
    options = options if options is not None else {}
    key = id(options)
    if key not in _SESSIONS_BY_OPTIONS:
        backend = GraphoptBackend(make_options(options))
        _SESSIONS_BY_OPTIONS[key] = (options, backend)
    return _SESSIONS_BY_OPTIONS[key][1](graph_module, example_inputs)


def session_for_options(options: dict) -> Session | None:
    entry = _SESSIONS_BY_OPTIONS.get(id(options))
    return entry[1].session if entry else None
